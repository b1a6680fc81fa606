"""Defences: perturbations a service applies to what it returns.

A defence is a callable object with two hooks, both optional in effect (the base class
returns its input unchanged): ``probabilities(p)`` on the (N, K) probabilities and
``explanation(e)`` on the explanation maps. The oracle applies them in order, after it has
computed the honest answer, so the query ledger is unaffected.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "Defense",
    "RoundProbabilities",
    "ExplanationNoise",
    "ExplanationSign",
    "ExplanationTopK",
    "build_defense",
    "DEFENSES",
]


class Defense:
    name = "none"

    def probabilities(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def explanation(
        self, e: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return e

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class RoundProbabilities(Defense):
    """Round probabilities to `decimals` places (a common API default)."""

    name = "round"

    def __init__(self, decimals: int = 2):
        if int(decimals) < 0:
            raise ValueError(f"round decimals: expected >= 0, got {decimals}")
        self.decimals = int(decimals)

    def probabilities(self, p: torch.Tensor) -> torch.Tensor:
        return torch.round(p, decimals=self.decimals)


class ExplanationNoise(Defense):
    """Add Gaussian noise to each map, scaled to `scale` times that map's own std."""

    name = "noise"

    def __init__(self, scale: float = 0.5):
        if not float(scale) >= 0:
            raise ValueError(f"noise scale: expected >= 0, got {scale}")
        self.scale = float(scale)

    def explanation(
        self, e: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        dims = tuple(range(e.dim() - 3, e.dim()))
        std = e.std(dim=dims, keepdim=True)
        noise = torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        return e + self.scale * std * noise


class ExplanationSign(Defense):
    """Return only the sign of each attribution (direction without magnitude)."""

    name = "sign"

    def explanation(
        self, e: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.sign(e)


class ExplanationTopK(Defense):
    """Keep only the `fraction` of attributions with the largest magnitude per map."""

    name = "topk"

    def __init__(self, fraction: float = 0.1):
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"topk fraction: expected in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def explanation(
        self, e: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        flat = e.flatten(e.dim() - 3)
        k = max(1, int(round(self.fraction * flat.shape[-1])))
        threshold = flat.abs().topk(k, dim=-1).values[..., -1:]
        return (flat * (flat.abs() >= threshold)).view_as(e)


DEFENSES = {
    "round": RoundProbabilities,
    "noise": ExplanationNoise,
    "sign": ExplanationSign,
    "topk": ExplanationTopK,
}


def build_defense(spec: str) -> Defense:
    """Parse 'name' or 'name:value' (e.g. 'round:2', 'noise:0.5', 'topk:0.1', 'sign')."""
    name, _, value = spec.partition(":")
    if name not in DEFENSES:
        raise ValueError(f"defense: unknown {name!r}; expected one of {', '.join(DEFENSES)}")
    cls = DEFENSES[name]
    if not value:
        return cls()
    if cls is ExplanationSign:
        raise ValueError("defense 'sign' takes no value")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"defense {name!r}: value {value!r} is not a number") from None
    return cls(int(number) if cls is RoundProbabilities else number)
