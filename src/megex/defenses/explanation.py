"""Explanation-side defences: they change the maps a service returns, (N, C, H, W) or one
per class (N, K, C, H, W), or (``smooth``) the explanation it computes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..explain import MAX_PASSES, MAX_SIGMA, Explanation
from ..settings import AT_LEAST_0, COUNT, Number, setting
from .base import Defense

__all__ = [
    "Coarsen",
    "ExplanationNoise",
    "ExplanationSign",
    "ExplanationTopK",
    "GaussianNoise",
    "LaplaceNoise",
    "PredictedClassOnly",
    "Quantize",
    "SmoothGradDefense",
    "Withhold",
]


def _map_dims(e: torch.Tensor) -> tuple[int, int, int]:
    """The dimensions of one map (C, H, W): the last three, for (N, ...) and (N, K, ...)."""
    if e.dim() not in (4, 5):
        raise ValueError(
            f"explanation: expected maps of shape (N, C, H, W) or (N, K, C, H, W), "
            f"got {tuple(e.shape)}"
        )
    return (e.dim() - 3, e.dim() - 2, e.dim() - 1)


def _rms(e: torch.Tensor) -> torch.Tensor:
    """Each map's norm divided by the square root of its size (broadcastable to e)."""
    return e.pow(2).mean(dim=_map_dims(e), keepdim=True).sqrt()


_NOISE_SCALE = "noise norm relative to the map's norm"


# --- noise, quantisation, sparsity --------------------------------------------------------


@dataclass(frozen=True)
class GaussianNoise(Defense):
    """Add Gaussian noise to each map, scaled to that map's norm: the noise's expected
    squared norm is scale^2 times the map's (per-value std = scale * ||map|| / sqrt(size)),
    so a strength means the same on any model. All-zero maps stay zero."""

    name = "gaussian"
    side = "explanation"
    summary = "add Gaussian noise whose norm is `scale` times the map's"

    scale: float = setting(0.5, _NOISE_SCALE, AT_LEAST_0)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        noise = torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        return e + self.scale * _rms(e) * noise


# The earlier name of the Gaussian defence, for code that imports it.
ExplanationNoise = GaussianNoise


@dataclass(frozen=True)
class LaplaceNoise(Defense):
    """Add Laplace noise to each map, scaled to that map's norm as :class:`GaussianNoise`
    (same expected squared norm: Laplace scale b = scale * ||map|| / sqrt(2 * size))."""

    name = "laplace"
    side = "explanation"
    summary = "add Laplace noise whose norm is `scale` times the map's"

    scale: float = setting(0.5, _NOISE_SCALE, AT_LEAST_0)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        # A Laplace variable with scale 1 is the difference of two Exp(1) variables.
        a = torch.empty(e.shape, dtype=e.dtype).exponential_(generator=generator)
        b = torch.empty(e.shape, dtype=e.dtype).exponential_(generator=generator)
        b_scale = self.scale * _rms(e) / math.sqrt(2.0)
        return e + b_scale * (a - b).to(e.device)


@dataclass(frozen=True)
class Quantize(Defense):
    """Quantise each map to `bits` bits, symmetrically around 0: values become multiples of
    step = max|map| / (2^(bits-1) - 1), rounded to the nearest, so 0 stays 0 and the
    largest magnitude is kept exactly (bits=2: -step, 0, +step). All-zero maps stay zero."""

    name = "quantize"
    side = "explanation"
    summary = "quantise each map to k bits, symmetric around 0"

    bits: int = setting(4, "bits per value, sign included", Number(2, 16, whole=True))

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        levels = 2 ** (self.bits - 1) - 1
        peak = e.abs().amax(dim=_map_dims(e), keepdim=True)
        step = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
        return torch.round(e / step) * step


@dataclass(frozen=True)
class ExplanationTopK(Defense):
    """Keep only the `fraction` of attributions with the largest magnitude in each map (the
    others become 0; values tied with the smallest kept one are kept too)."""

    name = "topk"
    side = "explanation"
    summary = "keep only the largest-magnitude fraction of each map"

    fraction: float = setting(0.1, "fraction of values kept", Number(0, 1, low_open=True))

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        flat = e.flatten(e.dim() - 3)
        k = max(1, int(round(self.fraction * flat.shape[-1])))
        threshold = flat.abs().topk(k, dim=-1).values[..., -1:]
        return (flat * (flat.abs() >= threshold)).view_as(e)


@dataclass(frozen=True)
class ExplanationSign(Defense):
    """Return only the sign of each attribution (direction without magnitude)."""

    name = "sign"
    side = "explanation"
    summary = "return only the sign of each attribution"

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        return torch.sign(e)


# --- what is explained, and how finely ----------------------------------------------------


@dataclass(frozen=True)
class PredictedClassOnly(Defense):
    """Explain only the predicted class. Maps of every class (N, K, C, H, W): the predicted
    class's map is kept and the others are zeroed. One map per image (N, C, H, W) for a
    class index target: zeroed where that class is not the predicted one. Maps of the
    predicted class are returned unchanged."""

    name = "predicted-only"
    side = "explanation"
    summary = "keep the predicted class's map, zero the maps of other classes"

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        if labels is None:
            raise ValueError("defense 'predicted-only': needs the predicted labels")
        labels = labels.to(e.device)
        if e.dim() == 5:
            keep = F.one_hot(labels, e.shape[1]).to(e.dtype)
            return e * keep.view(*keep.shape, 1, 1, 1)
        if isinstance(target, int) and not isinstance(target, bool):
            keep = (labels == target).to(e.dtype)
            return e * keep.view(-1, 1, 1, 1)
        return e


@dataclass(frozen=True)
class SmoothGradDefense(Defense):
    """Return SmoothGrad instead of the plain gradient: the service computes the average of
    `samples` gradients at the image plus Gaussian noise of std `sigma` (on the [0, 1]
    scale), drawn from its seeded generator. A request for "gradient" is computed as
    "smoothgrad" with these settings; one for "smoothgrad" gets at least this sigma and
    these samples. Integrated gradients and input x gradient cannot be smoothed this way:
    a service with this defence does not offer them (ExplanationNotOffered, HTTP 403).

    The answer reports the explanation that was asked for (target and output are unchanged;
    a service does not announce its defences), and the compute it costs is SmoothGrad's,
    counted in model passes (:func:`megex.compute.passes_per_image`).
    """

    name = "smooth"
    side = "explanation"
    summary = "compute SmoothGrad (noise sigma, samples) instead of the plain gradient"

    sigma: float = setting(
        0.1, "noise std on the [0, 1] scale", Number(0, MAX_SIGMA, low_open=True)
    )
    samples: int = setting(
        8, "noisy gradients averaged per image", Number(1, MAX_PASSES, whole=True)
    )

    def computed_explanation(self, spec: Explanation) -> Explanation:
        if spec.method == "gradient":
            sigma, samples = self.sigma, self.samples
        elif spec.method == "smoothgrad":
            sigma = max(self.sigma, spec.params["sigma"])
            samples = max(self.samples, spec.params["samples"])
        else:
            raise ValueError(
                f"defense 'smooth': applies to gradient and smoothgrad explanations, not "
                f"{spec.method}"
            )
        return Explanation(
            "smoothgrad", target=spec.target, output=spec.output, sigma=sigma, samples=samples
        )


@dataclass(frozen=True)
class Coarsen(Defense):
    """Average each map over p x p patches (per channel) and return it at full size, every
    pixel of a patch holding the patch's mean; patches at the right and bottom edges are
    smaller when p does not divide the size."""

    name = "coarsen"
    side = "explanation"
    summary = "average each map over p x p patches (same shape returned)"

    patch: int = setting(2, "patch side p, in pixels", COUNT)

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        p = self.patch
        if p == 1:
            return e
        h, w = e.shape[-2:]
        planes = e.reshape(-1, 1, h, w)
        pad = (0, -w % p, 0, -h % p)
        total = F.avg_pool2d(F.pad(planes, pad), p) * (p * p)
        count = F.avg_pool2d(F.pad(torch.ones_like(planes[:1]), pad), p) * (p * p)
        means = total / count
        full = means.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        return full[..., :h, :w].reshape(e.shape).to(e.dtype)


@dataclass(frozen=True)
class Withhold(Defense):
    """Withhold the maps of a random `fraction` of the images: each image independently,
    with that probability, gets all-zero maps (every class's, for target "all"), while its
    prediction is returned and its query counted as usual.

    All-zero is the convention for "no map": MEGEX (:meth:`megex.attacks.megex.MEGEX.
    loss_with_maps`) reads a zero attribution as one the map does not tell, so a withheld
    image adds nothing to its gradient-matching term, and its generator step gets no
    victim gradient from it.
    """

    name = "withhold"
    side = "explanation"
    summary = "return all-zero maps for a random fraction of the images"

    fraction: float = setting(0.5, "probability that an image's maps are withheld", Number(0, 1))

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        _map_dims(e)
        draws = torch.rand(e.shape[0], generator=generator)
        shown = (draws >= self.fraction).to(e.dtype).to(e.device)
        return e * shown.view(-1, *([1] * (e.dim() - 1)))
