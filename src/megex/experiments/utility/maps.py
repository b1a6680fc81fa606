"""What a defended map keeps of the undefended one (similarity) and of the victim
(faithfulness: deletion and insertion curves); see :mod:`megex.experiments.utility`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "cosine_similarity",
    "curve_area",
    "perturbation_curve",
    "pixel_order",
    "pixels_per_step",
    "quantus_deletion_curve",
    "spearman_correlation",
    "top_k_count",
    "top_k_overlap",
]


# --- similarity of two maps ---------------------------------------------------------------


def _rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"maps: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()


def cosine_similarity(reference: torch.Tensor, defended: torch.Tensor) -> torch.Tensor:
    """Per map (first dimension), the cosine of the two maps' angle; 0 where either is zero."""
    a, b = _rows(reference, defended)
    norms = a.norm(dim=1) * b.norm(dim=1)
    dot = (a * b).sum(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot)).float()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) of a 1-D tensor's values, tied values sharing their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2
    return average[inverse]


def spearman_correlation(reference: torch.Tensor, defended: torch.Tensor) -> torch.Tensor:
    """Per map, Spearman's rank correlation of the signed values (ties get their average
    rank); 0 where either map is constant."""
    a, b = _rows(reference, defended)
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i]), _average_ranks(b[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = ra.norm() * rb.norm()
        if denominator > 0:
            out[i] = (ra * rb).sum() / denominator
    return out.float()


def _top_indices(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the k largest values of each row, ties in random order."""
    return _order(x, generator)[:, :k]


def _order(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's indices by decreasing value, ties in random order (drawn from generator)."""
    shuffle = torch.rand(x.shape, generator=generator).argsort(dim=1)
    ranked = torch.sort(x.gather(1, shuffle), dim=1, descending=True, stable=True).indices
    return shuffle.gather(1, ranked)


def top_k_overlap(
    reference: torch.Tensor,
    defended: torch.Tensor,
    fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per map, the share of the reference map's k largest-magnitude values that are also
    among the defended map's k largest, k = round(fraction * values per map), at least 1.
    Ties are broken at random (`generator`), so a constant map overlaps by chance (k/size)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {fraction}")
    a, b = _rows(reference, defended)
    k = top_k_count(a.shape[1], fraction)
    top_a = _top_indices(a.abs(), k, generator)
    top_b = _top_indices(b.abs(), k, generator)
    hits = torch.zeros_like(a, dtype=torch.bool).scatter_(1, top_a, True).gather(1, top_b)
    return hits.float().sum(dim=1) / k


def top_k_count(size: int, fraction: float) -> int:
    return max(1, int(round(fraction * size)))


# --- faithfulness -------------------------------------------------------------------------


def pixel_order(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, H*W) pixel indices of maps (N, C, H, W), by decreasing attribution magnitude
    summed over channels; ties in random order (drawn from `generator`)."""
    if maps.dim() != 4:
        raise ValueError(f"maps: expected (N, C, H, W), got {tuple(maps.shape)}")
    magnitude = maps.detach().abs().sum(dim=1).reshape(maps.shape[0], -1).double()
    return _order(magnitude.cpu(), generator)


def pixels_per_step(pixels: int, steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a whole number >= 1, got {steps!r}")
    return math.ceil(pixels / min(steps, pixels))


def _fractions(pixels: int, per_step: int) -> torch.Tensor:
    count = math.ceil(pixels / per_step)
    changed = torch.arange(count + 1, dtype=torch.float64) * per_step
    return changed.clamp(max=pixels) / pixels


def perturbation_curve(
    model: torch.nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    mode: str = "deletion",
    steps: int = 16,
    baseline: float = 0.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion or insertion curve of each image: (fractions (S+1,), probabilities
    (N, S+1)).

    Pixels (every channel of one location) are changed in :func:`pixel_order` of `maps`,
    ceil(H*W / steps) per step: "deletion" sets them to `baseline` in the image, "insertion"
    copies them from the image into an image filled with `baseline`. Column j is the model's
    softmax probability of `classes` after j steps (column 0: the image itself for deletion,
    the all-baseline image for insertion); fractions[j] is the share of pixels changed.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode: expected 'deletion' or 'insertion', got {mode!r}")
    if images.dim() != 4 or maps.shape != images.shape:
        raise ValueError(
            f"maps: expected the images' shape {tuple(images.shape)}, got {tuple(maps.shape)}"
        )
    n, c, h, w = images.shape
    pixels = h * w
    per_step = pixels_per_step(pixels, steps)
    fractions = _fractions(pixels, per_step)
    changed = (fractions * pixels).round().long()  # pixels changed after each step
    # rank[i, p]: when pixel p of image i is changed (its position in the order).
    order = pixel_order(maps, generator)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels).expand(n, -1))
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    points = len(changed)
    per_batch = max(1, batch_size // points)
    out = torch.empty(n, points)
    try:
        with torch.no_grad():
            for start in range(0, n, per_batch):
                x = images[start : start + per_batch].cpu().float()
                m = x.shape[0]
                out[start : start + m] = _curve_points(
                    model, x, rank[start : start + m], changed, classes[start : start + m],
                    mode, baseline, device,
                )  # fmt: skip
    finally:
        model.train(was_training)
    return fractions.float(), out


def _curve_points(
    model: torch.nn.Module,
    x: torch.Tensor,
    rank: torch.Tensor,
    changed: torch.Tensor,
    classes: torch.Tensor,
    mode: str,
    baseline: float,
    device: torch.device,
) -> torch.Tensor:
    """(m, S+1): the probability of `classes` on images `x` after each step's pixels changed
    (every step of every image in one pass of the model)."""
    m, c, h, w = x.shape
    points = len(changed)
    # mask[i, j, p]: pixel p of image i is changed after j steps.
    mask = rank[:, None, :] < changed[None, :, None]
    mask = mask.view(m, points, 1, h, w)
    full = x[:, None].expand(m, points, c, h, w)
    filled = torch.full_like(full, float(baseline))
    if mode == "deletion":
        batch = torch.where(mask, filled, full)
    else:
        batch = torch.where(mask, full, filled)
    logits = model(batch.reshape(m * points, c, h, w).to(device)).float().cpu()
    probs = F.softmax(logits, dim=1).view(m, points, -1)
    picked = classes.cpu().view(m, 1, 1).expand(m, points, 1)
    return probs.gather(2, picked).squeeze(2)


def curve_area(fractions: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """Area under each curve (rows of `curves`) over `fractions`, by trapezoids."""
    x = fractions.double()
    y = curves.double()
    return ((y[:, 1:] + y[:, :-1]) / 2 * (x[1:] - x[:-1])).sum(dim=1).float()


def quantus_deletion_curve(
    model: torch.nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    steps: int = 16,
    baseline: float = 0.0,
) -> torch.Tensor:
    """The deletion curve of :func:`perturbation_curve` (N, S+1), computed by Quantus's
    pixel-flipping metric (``quantus.PixelFlipping``, Bach et al. 2015; the 'utility' extra).

    Quantus flips input values in order of the attribution of each value; it is given the
    magnitude summed over channels at every channel of a pixel, so that it removes whole
    pixels, C * ceil(H*W / steps) values a step (Quantus needs that number to divide H*W).
    Its curve starts after the first step: column 0 (the image itself) is prepended here.
    Ties between pixels are ordered by Quantus, not at random: curves agree with
    :func:`perturbation_curve` where magnitudes differ between pixels. Quantus refuses a
    batch whose maps are all zero or all equal.
    """
    quantus = _import_quantus()
    n, c, h, w = images.shape
    per_step = pixels_per_step(h * w, steps)
    if (h * w) % (c * per_step):
        raise ValueError(
            f"steps: Quantus flips {c} x {per_step} values a step, which must divide the "
            f"{h * w} pixels; choose steps so that it does (e.g. a divisor of {h * w // c})"
        )
    magnitude = maps.detach().abs().sum(dim=1, keepdim=True).expand(n, c, h, w)
    metric = _pixel_flipping(quantus, c * per_step, baseline)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # Quantus warns for every step that leaves an image unchanged (a black pixel
            # set to a black baseline), which is expected here.
            warnings.simplefilter("ignore")
            flipped = metric(
                model=model,
                x_batch=images.detach().cpu().numpy().astype(np.float32),
                y_batch=classes.cpu().numpy(),
                a_batch=magnitude.cpu().numpy().astype(np.float32),
                channel_first=True,
                softmax=True,
                device="cpu",
                batch_size=n,
            )
        with torch.no_grad():
            first = F.softmax(model(images.float()).float(), dim=1)
        first = first.gather(1, classes.view(-1, 1)).cpu()
    finally:
        model.train(was_training)
    return torch.cat([first, torch.tensor(np.asarray(flipped), dtype=torch.float32)], dim=1)


def _import_quantus() -> Any:
    """The quantus module, or an error that names the extra that installs it."""
    try:
        import quantus
    except ImportError as err:  # not installed, or a library it loads is missing
        raise ModuleNotFoundError(
            f"Quantus metrics need the 'utility' extra (pip install 'megex[utility]'): {err}",
            name=getattr(err, "name", None) or "quantus",
        ) from None
    return quantus


def _pixel_flipping(quantus: Any, values_per_step: int, baseline: float) -> Any:
    """Quantus's pixel-flipping metric: the raw curve, `values_per_step` values a step set to
    `baseline` by attribution magnitude, quietly."""
    return quantus.PixelFlipping(
        features_in_step=values_per_step,
        abs=True,
        normalise=False,
        perturb_baseline=float(baseline),
        return_auc_per_sample=False,
        disable_warnings=True,
        display_progressbar=False,
    )
