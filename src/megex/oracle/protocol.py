"""What crosses the oracle's boundary: the :class:`Oracle` protocol, the :class:`Answer`, the
check of the images sent (:func:`validate_images`), the refusals, :class:`OracleView`, and
what the oracle needs of a victim (:class:`VictimModel`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..explain import Explanation

__all__ = [
    "PREDICTION_MODES",
    "Answer",
    "ExplanationNotOffered",
    "InvalidQuery",
    "Oracle",
    "OracleView",
    "VictimModel",
    "validate_images",
]

PREDICTION_MODES = ("probabilities", "logits", "top-k", "label")


class InvalidQuery(ValueError):
    """The images sent to the oracle are not valid (shape, dtype, range, NaN/inf)."""


class ExplanationNotOffered(ValueError):
    """The oracle does not return the explanation that was asked for."""


@dataclass
class Answer:
    """What the oracle returns for a batch of N images.

    probabilities: (N, K) float32 as the service exposes them (top-k: others are 0;
    label only: one-hot). logits: (N, K) in "logits" mode, else None. labels: (N,) argmax.
    explanation: (N, K, C, H, W) for target "all", (N, C, H, W) otherwise, or None;
    explanation_spec says which explanation it is.
    """

    probabilities: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None
    explanation: torch.Tensor | None = None
    explanation_spec: Explanation | None = None
    prediction: str = "probabilities"


@runtime_checkable
class Oracle(Protocol):
    """Anything an attack can query: in-process, over HTTP, or the user's own."""

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def queries_used(self) -> int: ...

    @property
    def remaining(self) -> int | float: ...

    def query(self, x: torch.Tensor, explanation: Explanation | bool | None = None) -> Answer: ...


class VictimModel(Protocol):
    """What an oracle needs of a victim (:class:`megex.Victim` is one): a torch module that
    maps float32 images in [0, 1] to logits (normalisation is its own business) and states
    the shape of its images and its number of classes."""

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def validate_images(
    x: Any, input_shape: Sequence[int], name: str = "x", keep_device: bool = False
) -> torch.Tensor:
    """Check a batch of images and return it as a float32 CPU tensor (on its own device with
    `keep_device`), or raise InvalidQuery."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidQuery(
                f"{name}: dtype {x.dtype} is not floating point; send float32 images in [0, 1] "
                "(divide uint8 images by 255)"
            )
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InvalidQuery(
            f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise InvalidQuery(
            f"{name}: dtype {x.dtype} is not floating point; send float32 images in [0, 1] "
            "(divide uint8 images by 255)"
        )
    expected = tuple(int(s) for s in input_shape)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise InvalidQuery(
            f"{name}: shape {tuple(x.shape)} does not match (N, {', '.join(map(str, expected))})"
        )
    if x.shape[0] == 0:
        raise InvalidQuery(f"{name}: the batch is empty")
    x = x.detach().to(x.device if keep_device else "cpu", torch.float32)
    # One read of the values (on an accelerator, the one wait for the device in answering:
    # bad images are refused before they are charged).
    summary = torch.stack([torch.isfinite(x).all().to(x.dtype), x.amin(), x.amax()])
    finite, lo, hi = summary.tolist()
    if not finite:
        raise InvalidQuery(f"{name}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise InvalidQuery(f"{name}: values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")
    return x


class OracleView:
    """An Oracle in front of another: its shape, classes, count and what it has left are the
    wrapped oracle's, and every query goes through to it. Subclasses watch or limit the
    queries (a run's budget, a recording, a query monitor)."""

    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.oracle.input_shape

    @property
    def num_classes(self) -> int:
        return self.oracle.num_classes

    @property
    def queries_used(self) -> int:
        return self.oracle.queries_used

    @property
    def remaining(self) -> int | float:
        return self.oracle.remaining

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        return self.oracle.query(x, explanation=explanation)
