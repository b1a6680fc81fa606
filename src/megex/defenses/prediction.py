"""Prediction-side defences: they change the (N, K) probabilities a service returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import COUNT, FLAG, POSITIVE, Number, setting
from .base import Defense

__all__ = ["LabelOnly", "ReverseSigmoid", "RoundProbabilities", "TopClasses"]


@dataclass(frozen=True)
class RoundProbabilities(Defense):
    """Round probabilities to `decimals` places (a common API default). Rounding is
    monotone, so the predicted class keeps the largest value, possibly tied with others."""

    name = "round"
    side = "prediction"
    summary = "round probabilities to a number of decimal places"

    decimals: int = setting(2, "decimal places kept", Number(0, 8, whole=True))

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return torch.round(p, decimals=self.decimals)


@dataclass(frozen=True)
class TopClasses(Defense):
    """Return only the `k` largest probabilities, the others as 0 (not renormalised, as the
    prediction mode "top-k" does); the predicted class is always among those kept."""

    name = "top-classes"
    side = "prediction"
    summary = "return only the k largest probabilities, the others as 0"

    k: int = setting(3, "classes whose probability is returned", COUNT)

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.k >= p.shape[1]:
            return p
        ranking = p.clone()
        if labels is not None:
            # Ties at the top must not push the predicted class out.
            ranking.scatter_(1, labels.view(-1, 1).to(p.device), math.inf)
        keep = ranking.topk(self.k, dim=1).indices
        return torch.zeros_like(p).scatter_(1, keep, p.gather(1, keep))


@dataclass(frozen=True)
class LabelOnly(Defense):
    """Return only the predicted class, as a one-hot vector."""

    name = "label-only"
    side = "prediction"
    summary = "return only the predicted class, as a one-hot vector"

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        labels = p.argmax(dim=1) if labels is None else labels.to(p.device)
        return F.one_hot(labels, p.shape[1]).to(p.dtype)


@dataclass(frozen=True)
class ReverseSigmoid(Defense):
    """The reverse sigmoid perturbation of Lee, Edwards, Molloy and Srivatsa, "Defending
    against NN model stealing attacks using deceptive perturbations" (IEEE S&P Workshops
    2019, arXiv 1806.00054):

        r(y) = beta * (s(gamma * s^-1(y)) - 1/2),    y' = alpha * (y - r(y)),

    with s the sigmoid, s^-1(y) = log(y / (1 - y)) applied to each probability, and alpha
    the normaliser that makes y' sum to 1. beta (> 0) scales the perturbation, gamma (> 0)
    sets how fast it saturates. As in the Adversarial Robustness Toolbox's implementation,
    y is clipped to [1e-9, 1 - 1e-9] inside s^-1 and y - r(y) at 0 before normalising.

    The perturbation is not monotone (for small gamma it raises small probabilities more
    than larger ones), so for some outputs the predicted class would lose the largest
    value; with `keep_label` (the default, the paper's aim of an accuracy-preserving
    defence) the predicted class's value is then swapped with the largest one. With
    keep_label=false the formula is returned as it is, and the label can change.
    """

    name = "reverse-sigmoid"
    side = "prediction"
    summary = "Lee et al.'s reverse sigmoid perturbation of the probabilities"
    _CLIP = 1e-9

    beta: float = setting(1.0, "size of the perturbation", POSITIVE)
    gamma: float = setting(0.1, "steepness of the sigmoid", POSITIVE)
    keep_label: bool = setting(True, "swap values so that the predicted class stays on top", FLAG)

    @property
    def keeps_label(self) -> bool:  # type: ignore[override]
        return self.keep_label

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        # float64: s^-1 of probabilities near 1 needs more than float32's precision.
        y = p.double()
        clipped = y.clamp(self._CLIP, 1 - self._CLIP)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(clipped)) - 0.5)
        out = (y - r).clamp_min(0.0)
        out = out / out.sum(dim=1, keepdim=True)
        if self.keep_label:
            labels = p.argmax(dim=1) if labels is None else labels.to(p.device)
            out = _label_on_top(out, labels)
        return out.to(p.dtype)


def _label_on_top(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Swap each row's value at `labels` with its largest value, where they differ."""
    rows = torch.arange(p.shape[0], device=p.device)
    top = p.argmax(dim=1)
    at_label = p[rows, labels]
    largest = p[rows, top]
    out = p.clone()
    out[rows, top] = at_label
    out[rows, labels] = largest
    return out
