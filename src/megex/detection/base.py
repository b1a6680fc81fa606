"""What every query-stream monitor shares: settings declared as dataclass fields, a state
per key, measurements and flags, and saving the state."""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..settings import COUNT_0, Number, OrNone, declared, read, setting

__all__ = ["Flag", "Measurement", "Monitor", "crosses", "first_crossing"]


@dataclass(frozen=True)
class Flag:
    """A key whose statistic crossed its monitor's threshold, and when."""

    key: Hashable
    monitor: str
    statistic: float
    threshold: float
    queries_seen: int
    time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Measurement(NamedTuple):
    """The monitor's statistic for one key after its `queries_seen`-th query."""

    queries_seen: int
    statistic: float


def first_crossing(
    measurements: Iterable[Measurement], threshold: float, flags_when: str
) -> Measurement | None:
    """The first measurement past `threshold` ("below" or "above" it), or None."""
    for m in measurements:
        if crosses(m.statistic, threshold, flags_when):
            return m
    return None


def crosses(statistic: float, threshold: float | None, flags_when: str) -> bool:
    """Whether `statistic` lies past `threshold` (never for NaN or no threshold)."""
    if threshold is None or math.isnan(statistic):
        return False
    return statistic < threshold if flags_when == "below" else statistic > threshold


class _Params:
    """`Monitor.PARAMS`: each setting's name and type, the threshold excluded, read from the
    class's fields (the monitor's own settings first, then those every monitor has)."""

    def __get__(self, obj: Any, cls: type) -> dict[str, type]:
        shared = [f.name for f in declared(Monitor) if f.name != "threshold"]
        own = [f for f in declared(cls) if f.name not in shared and f.name != "threshold"]
        ordered = own + [f for f in declared(cls) if f.name in shared]
        return {f.name: f.metadata["check"].kind for f in ordered}


_SAME = object()


@dataclass(eq=False)
class Monitor:
    """A query-stream monitor with a state per key.

    A monitor is a dataclass whose fields are its settings (:func:`megex.settings.setting`:
    default, help and rule, written once); the generated constructor takes them as values
    or as text and checks each, raising ValueError that names the monitor and the setting.
    Subclasses set `name` and `flags_when` ("below": a small statistic is suspicious,
    "above": a large one), declare their settings after ``_: KW_ONLY`` and implement
    `_new_state` and `_update` (their key states carry `queries`, `flagged` and
    `safe_since`). :attr:`PARAMS` lists the settings except the threshold.
    """

    name: ClassVar[str] = "monitor"
    flags_when: ClassVar[str] = "below"
    PARAMS = _Params()  # not annotated: a class attribute computed from the fields

    threshold: float | None = setting(
        None, "statistic past which a key is flagged; None: measure only", OrNone(Number())
    )
    _: KW_ONLY
    rearm: int = setting(
        1000,
        "queries a flagged key's statistic must stay on the safe side before a new crossing "
        "flags it again",
        COUNT_0,
    )

    def __post_init__(self) -> None:
        for f in declared(self):
            where = f"monitor {self.name!r}: {f.name}"
            setattr(self, f.name, read(f, getattr(self, f.name), where))
        # What the threshold was calibrated on (Calibration.about), when it was.
        self.calibrated_on: dict[str, Any] = {}
        self._keys: dict[Hashable, Any] = {}

    # --- what a subclass provides ---------------------------------------------------------

    def _new_state(self) -> Any:
        raise NotImplementedError

    def _update(self, state: Any, images: np.ndarray, probabilities: np.ndarray) -> list:
        raise NotImplementedError

    # --- settings -------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The monitor's settings except its threshold (what a calibration was made with)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    def fresh(self, threshold: float | None | object = _SAME) -> Monitor:
        """A monitor with the same settings and no state, with this monitor's threshold or
        the one given (None: measure only)."""
        chosen = self.threshold if threshold is _SAME else threshold
        return type(self)(threshold=chosen, **self.params())

    def describe(self) -> dict[str, Any]:
        return {"monitor": self.name, "threshold": self.threshold, **self.params()}

    # --- watching -------------------------------------------------------------------------

    def update(self, key: Hashable, images: Any, probabilities: Any) -> list[Measurement]:
        """Take in one batch of `key`'s queries, in order; the measurements it produced."""
        x, p = _as_batch(images, probabilities)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = self._new_state()
        return self._update(state, x, p)

    def flags_for(self, key: Hashable, measurements: Sequence[Measurement]) -> list[Flag]:
        """Flags for `key`'s new measurements: one at its first crossing of the threshold,
        and again at a crossing after its statistic stayed on the safe side for `rearm`
        queries."""
        state = self._keys.get(key)
        if state is None or self.threshold is None:
            return []
        flags = []
        for m in measurements:
            if crosses(m.statistic, self.threshold, self.flags_when):
                if not state.flagged:
                    flags.append(
                        Flag(
                            key, self.name, m.statistic, self.threshold, m.queries_seen, time.time()
                        )
                    )
                state.flagged, state.safe_since = True, -1
            elif state.flagged:
                if state.safe_since < 0:
                    state.safe_since = m.queries_seen
                if m.queries_seen - state.safe_since >= self.rearm:
                    state.flagged, state.safe_since = False, -1
        return flags

    def observe(self, key: Hashable, images: Any, probabilities: Any) -> list[Flag]:
        """Take in one batch of `key`'s queries; the flags it raised."""
        return self.flags_for(key, self.update(key, images, probabilities))

    def queries_seen(self, key: Hashable) -> int:
        state = self._keys.get(key)
        return 0 if state is None else state.queries

    def is_flagged(self, key: Hashable) -> bool:
        """Whether `key` has been flagged and not re-armed since."""
        state = self._keys.get(key)
        return bool(state is not None and state.flagged)

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def forget(self, key: Hashable) -> None:
        """Drop `key`'s state (its history starts over)."""
        self._keys.pop(key, None)

    # --- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Settings and every key's state, as tensors and plain values
        (``torch.save``-able and readable with ``weights_only=True``)."""
        return {
            "monitor": self.name,
            "threshold": self.threshold,
            "params": self.params(),
            "keys": [(key, state.to_dict()) for key, state in self._keys.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the keys' states saved by a monitor with the same settings."""
        if state.get("monitor") != self.name:
            raise ValueError(f"state: saved by monitor {state.get('monitor')!r}, not {self.name!r}")
        if state.get("params") != self.params():
            raise ValueError(
                f"state: saved with settings {state.get('params')}, this monitor has "
                f"{self.params()}"
            )
        keys = {}
        for key, saved in state["keys"]:
            fresh = self._new_state()
            fresh.load_dict(saved)
            keys[key] = fresh
        self._keys = keys


def _as_batch(images: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_array(images, "images", np.float32)
    p = _as_array(probabilities, "probabilities", np.float64)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {x.shape}")
    if p.ndim != 2 or p.shape[0] != x.shape[0]:
        raise ValueError(
            f"probabilities: expected ({x.shape[0]}, K) for {x.shape[0]} images, got {p.shape}"
        )
    return x, p


def _as_array(value: Any, name: str, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.float32)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False)
    raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(value).__name__}")
