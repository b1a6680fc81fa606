"""Query streams in process: a client's queries in order (:class:`QueryStream`), replaying
one to a monitor, and oracles that record a run's queries or put monitors in front of it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..oracle import Answer, Oracle, OracleView
from .base import Flag, Measurement, Monitor

__all__ = ["MonitoredOracle", "QueryStream", "RecordingOracle", "replay"]


@dataclass
class QueryStream:
    """One client's queries in order: images (N, C, H, W) float32 in [0, 1] and the
    victim's honest probabilities (N, K)."""

    images: torch.Tensor
    probabilities: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.probabilities.dim() != 2:
            raise ValueError(
                f"stream {self.name!r}: expected images (N, C, H, W) and probabilities "
                f"(N, K), got {tuple(self.images.shape)} and {tuple(self.probabilities.shape)}"
            )
        if len(self.images) != len(self.probabilities):
            raise ValueError(
                f"stream {self.name!r}: {len(self.images)} images but "
                f"{len(self.probabilities)} rows of probabilities"
            )

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_victim(cls, victim: Any, images: torch.Tensor, name: str = "") -> QueryStream:
        """A stream of `images` with the probabilities `victim` (logits out) gives them."""
        images = images.detach().to("cpu", torch.float32)
        device = next(iter(victim.parameters()), torch.empty(0)).device
        parts = []
        with torch.no_grad():
            was_training = victim.training
            victim.eval()
            for i in range(0, len(images), 1024):
                logits = victim(images[i : i + 1024].to(device))
                parts.append(torch.softmax(logits.float().cpu(), dim=1))
            victim.train(was_training)
        return cls(images, torch.cat(parts), name)


def replay(
    monitor: Monitor, stream: QueryStream, key: Hashable = "replay", batch_size: int = 256
) -> list[Measurement]:
    """Feed `stream` to `monitor` as `key`'s queries, `batch_size` at a time; every
    measurement it produced (the key's state stays in the monitor)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    out: list[Measurement] = []
    for i in range(0, len(stream), batch_size):
        out += monitor.update(
            key, stream.images[i : i + batch_size], stream.probabilities[i : i + batch_size]
        )
    return out


class RecordingOracle(OracleView):
    """An Oracle that passes every query on and records its images and the probabilities
    returned, in order (:meth:`stream`). The probabilities are the answer's: the honest
    ones when the oracle returns probabilities without a defence of them."""

    def __init__(self, oracle: Oracle):
        super().__init__(oracle)
        self._images: list[torch.Tensor] = []
        self._probabilities: list[torch.Tensor] = []

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        answer = self.oracle.query(x, explanation=explanation)
        self._images.append(torch.as_tensor(x).detach().to("cpu", torch.float32).clone())
        self._probabilities.append(answer.probabilities.detach().to("cpu", torch.float32))
        return answer

    def stream(self, name: str = "") -> QueryStream:
        """Every query so far, in order."""
        if not self._images:
            c, h, w = self.input_shape
            return QueryStream(torch.zeros(0, c, h, w), torch.zeros(0, self.num_classes), name)
        return QueryStream(torch.cat(self._images), torch.cat(self._probabilities), name)


class MonitoredOracle(OracleView):
    """An Oracle under watch: every answered query is shown to `monitors` as `key`'s.

    probabilities: computes the honest probabilities of a batch of images (e.g.
    ``lambda x: torch.softmax(victim(x), 1)``); None uses the answer's, which are the honest
    ones when the oracle returns probabilities without a defence of them. `flags` collects
    every flag raised and `measurements` each monitor's measurements, so that an attack run
    through this oracle can be scored (was it flagged, after how many queries).
    """

    def __init__(
        self,
        oracle: Oracle,
        monitors: Sequence[Monitor],
        key: Hashable = "client",
        probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        names = [m.name for m in monitors]
        if len(set(names)) != len(names):
            raise ValueError(f"monitors: each kind once, got {names}")
        super().__init__(oracle)
        self.monitors = list(monitors)
        self.key = key
        self.probabilities = probabilities
        self.flags: list[Flag] = []
        self.measurements: dict[str, list[Measurement]] = {m.name: [] for m in monitors}

    @property
    def flagged(self) -> bool:
        """Whether any monitor has flagged the key so far."""
        return bool(self.flags)

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        answer = self.oracle.query(x, explanation=explanation)
        images = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if self.probabilities is None:
            probs = answer.probabilities
        else:
            with torch.no_grad():
                probs = self.probabilities(images)
        for monitor in self.monitors:
            measured = monitor.update(self.key, images, probs)
            self.measurements[monitor.name] += measured
            self.flags += monitor.flags_for(self.key, measured)
        return answer

    def first_flag(self) -> Flag | None:
        """The earliest flag by queries seen, or None."""
        return min(self.flags, key=lambda f: f.queries_seen, default=None)
