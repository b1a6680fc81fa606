"""Explanation utility under a defence: how much of an explanation's value a service keeps
for its honest users when it defends itself (:mod:`megex.defenses`).

This module sits beside :mod:`megex.evaluate` (which measures clones): it measures maps.
Every measure is taken per image on real test images, then reported as a mean with a 95%
interval over images (:func:`megex.stats.mean_interval`), for the undefended service too
(row "none"), so that a defence's utility can be read relative to it.

- Similarity of the defended map to the undefended one: :func:`cosine_similarity`,
  :func:`spearman_correlation` (of the signed values, ties ranked by their average rank) and
  :func:`top_k_overlap` (the fraction of the undefended map's k largest-magnitude values that
  are among the defended map's k largest; k = round(top_fraction * C * H * W), at least 1).
  Maps of every class are compared class by class and averaged over the classes.
- Faithfulness of the defended map to the victim: deletion and insertion curves
  (:func:`perturbation_curve`): pixels are removed from the image (set to `baseline`, 0 by
  default: black, on images in [0, 1]) or inserted into the all-`baseline` image, in order of
  the map's attribution magnitude (summed over channels; ties in random order), `steps` at a
  time, and the victim's probability of the explained class is read after each step. The
  area under each curve (trapezoids over the fraction of pixels changed, in [0, 1]) is the
  score: low for deletion and high for insertion mean a faithful map. Maps of every class
  are scored by the map of the predicted class. Deletion can also be computed by Quantus's
  pixel-flipping metric (:func:`quantus_deletion_curve`, the 'utility' extra), which orders
  tied pixels its own way (all-equal maps, which it refuses, keep the random order).

An all-zero map (a withheld one) scores 0 in cosine and Spearman, a chance overlap in top-k,
and the faithfulness of a random order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .defenses import Defense, build_defense
from .explain import Explanation
from .oracle import Responder, validate_images
from .stats import mean_interval
from .victim import Victim

__all__ = [
    "FAITHFULNESS_BACKENDS",
    "METRICS",
    "cosine_similarity",
    "curve_area",
    "explanation_utility",
    "perturbation_curve",
    "pixel_order",
    "quantus_deletion_curve",
    "spearman_correlation",
    "top_k_overlap",
    "utility_table",
]

# name -> (what it measures, whether higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "cosine": ("cosine similarity to the undefended map", True),
    "spearman": ("Spearman rank correlation with the undefended map", True),
    "top_k_overlap": ("share of the undefended map's top-k values kept in the top-k", True),
    "deletion_auc": ("area under the deletion curve (victim's probability)", False),
    "insertion_auc": ("area under the insertion curve (victim's probability)", True),
    "probability_l1": ("L1 distance of the returned probabilities to the honest ones", False),
    "label_kept": ("share of images whose predicted class keeps the largest probability", True),
}
FAITHFULNESS_BACKENDS = ("torch", "quantus")


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
    k = _top_k(a.shape[1], fraction)
    top_a = _top_indices(a.abs(), k, generator)
    top_b = _top_indices(b.abs(), k, generator)
    hits = torch.zeros_like(a, dtype=torch.bool).scatter_(1, top_a, True).gather(1, top_b)
    return hits.float().sum(dim=1) / k


def _top_k(size: int, fraction: float) -> int:
    return max(1, int(round(fraction * size)))


# --- faithfulness -------------------------------------------------------------------------


def pixel_order(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, H*W) pixel indices of maps (N, C, H, W), by decreasing attribution magnitude
    summed over channels; ties in random order (drawn from `generator`)."""
    if maps.dim() != 4:
        raise ValueError(f"maps: expected (N, C, H, W), got {tuple(maps.shape)}")
    magnitude = maps.detach().abs().sum(dim=1).reshape(maps.shape[0], -1).double()
    return _order(magnitude.cpu(), generator)


def _pixels_per_step(pixels: int, steps: int) -> int:
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
    per_step = _pixels_per_step(pixels, steps)
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
                # mask[i, j, p]: pixel p of image i is changed after j steps.
                mask = rank[start : start + m, None, :] < changed[None, :, None]
                mask = mask.view(m, points, 1, h, w)
                full = x[:, None].expand(m, points, c, h, w)
                filled = torch.full_like(full, float(baseline))
                if mode == "deletion":
                    batch = torch.where(mask, filled, full)
                else:
                    batch = torch.where(mask, full, filled)
                logits = model(batch.reshape(m * points, c, h, w).to(device)).float().cpu()
                probs = F.softmax(logits, dim=1).view(m, points, -1)
                picked = classes[start : start + m].cpu().view(m, 1, 1).expand(m, points, 1)
                out[start : start + m] = probs.gather(2, picked).squeeze(2)
    finally:
        model.train(was_training)
    return fractions.float(), out


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
    try:
        import quantus
    except ImportError as err:  # not installed, or a library it loads is missing
        raise ModuleNotFoundError(
            f"Quantus metrics need the 'utility' extra (pip install 'megex[utility]'): {err}",
            name=getattr(err, "name", None) or "quantus",
        ) from None
    n, c, h, w = images.shape
    per_step = _pixels_per_step(h * w, steps)
    if (h * w) % (c * per_step):
        raise ValueError(
            f"steps: Quantus flips {c} x {per_step} values a step, which must divide the "
            f"{h * w} pixels; choose steps so that it does (e.g. a divisor of {h * w // c})"
        )
    magnitude = maps.detach().abs().sum(dim=1, keepdim=True).expand(n, c, h, w)
    metric = quantus.PixelFlipping(
        features_in_step=c * per_step,
        abs=True,
        normalise=False,
        perturb_baseline=float(baseline),
        return_auc_per_sample=False,
        disable_warnings=True,
        display_progressbar=False,
    )
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


# --- the utility of a service's explanations under defences -------------------------------


Row = Defense | str | Sequence[Defense | str]


def _row(row: Row) -> list[Defense]:
    items = [row] if isinstance(row, (Defense, str)) else list(row)
    return [build_defense(d) if isinstance(d, str) else d for d in items]


def _label(defenses: Sequence[Defense]) -> str:
    return " + ".join(d.spec() for d in defenses) if defenses else "none"


def _explained_maps(maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The explained class's map of each image: maps (N, C, H, W) as they are; of every class
    (N, K, C, H, W), the map of `classes`."""
    if maps.dim() == 4:
        return maps
    return maps[torch.arange(maps.shape[0]), classes]


def _per_image(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-map values averaged over the maps of each image (one per class for target all)."""
    return values.view(n, -1).mean(dim=1)


def explanation_utility(
    victim: Victim,
    images: torch.Tensor,
    defenses: Sequence[Row],
    explanation: Explanation = Explanation("gradient"),
    *,
    steps: int = 16,
    top_fraction: float = 0.1,
    baseline: float = 0.0,
    seed: int = 0,
    faithfulness: str = "torch",
    level: float = 0.95,
    batch_size: int = 256,
) -> dict[str, Any]:
    """The utility of `victim`'s explanations on `images` (real test images, float32 in
    [0, 1], (N, C, H, W)) without a defence (row "none") and under each row of `defenses`.

    A row is a Defense, a spec (``"quantize:bits=4"``) or a list of them (applied in
    order). Each row's answers come from a :class:`~megex.oracle.Responder` with that row's
    defences and seed `seed`, exactly as the service would return them. For each row, per
    image: the similarity measures against the undefended maps (``cosine``, ``spearman``,
    ``top_k_overlap`` with `top_fraction`), faithfulness (``deletion_auc``,
    ``insertion_auc`` with `steps` and `baseline`; `faithfulness` "quantus" computes
    deletion with Quantus) and, for prediction defences, ``probability_l1`` (L1 distance of
    the returned probabilities to the honest ones, in [0, 2]) and ``label_kept`` (whether
    the victim's predicted class keeps the largest returned probability). Each is reported
    as {"mean", "low", "high"}: the mean over images and its `level` bootstrap interval.

    Returns {"explanation", "images", "steps", "top_fraction", "top_k", "baseline", "seed",
    "faithfulness", "level", "rows": [{"defense": label, "specs": [...], metric: {...}}]}.
    """
    if faithfulness not in FAITHFULNESS_BACKENDS:
        raise ValueError(
            f"faithfulness: expected one of {', '.join(FAITHFULNESS_BACKENDS)}, "
            f"got {faithfulness!r}"
        )
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {top_fraction}")
    if not math.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline}")
    _pixels_per_step(images.shape[-1] * images.shape[-2], steps)
    images = validate_images(images, victim.input_shape, "images")
    rows = [[]] + [_row(r) for r in defenses]
    n = images.shape[0]
    honest = Responder(victim, explanation=explanation, seed=seed, batch_size=batch_size)
    reference = honest.answer(images, explanation)
    labels = reference.labels
    classes = labels if not isinstance(explanation.target, int) else None
    if classes is None:
        classes = torch.full_like(labels, int(explanation.target))
    size = math.prod(images.shape[1:])  # values per map
    out_rows = []
    for row in rows:
        answer = (
            reference
            if not row
            else Responder(
                victim, explanation=explanation, defenses=row, seed=seed, batch_size=batch_size
            ).answer(images, explanation)
        )
        maps = answer.explanation
        per_map_ref = _flat_maps(reference.explanation)
        per_map = _flat_maps(maps)
        ties = torch.Generator().manual_seed(seed)
        values: dict[str, torch.Tensor] = {
            "cosine": _per_image(cosine_similarity(per_map_ref, per_map), n),
            "spearman": _per_image(spearman_correlation(per_map_ref, per_map), n),
            "top_k_overlap": _per_image(top_k_overlap(per_map_ref, per_map, top_fraction, ties), n),
        }
        explained = _explained_maps(maps, classes)
        values["deletion_auc"], values["insertion_auc"] = _faithfulness(
            victim, images, explained, classes, steps, baseline, seed, faithfulness, batch_size
        )
        probs = answer.probabilities
        values["probability_l1"] = (probs - reference.probabilities).abs().sum(dim=1)
        values["label_kept"] = (
            probs.gather(1, labels.view(-1, 1)).squeeze(1) >= probs.amax(1)
        ).float()
        entry: dict[str, Any] = {"defense": _label(row), "specs": [d.spec() for d in row]}
        for name in METRICS:
            mean, low, high = mean_interval(values[name].tolist(), level=level, seed=seed)
            entry[name] = {"mean": mean, "low": low, "high": high}
        out_rows.append(entry)
    return {
        "explanation": explanation.to_dict(),
        "images": n,
        "steps": steps,
        "top_fraction": top_fraction,
        "top_k": _top_k(size, top_fraction),
        "baseline": baseline,
        "seed": seed,
        "faithfulness": faithfulness,
        "level": level,
        "rows": out_rows,
    }


def _flat_maps(maps: torch.Tensor) -> torch.Tensor:
    """Maps (N, C, H, W) as they are; (N, K, C, H, W) as N*K maps, image by image."""
    return maps.reshape(-1, *maps.shape[-3:])


def _faithfulness(
    victim: torch.nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int,
    baseline: float,
    seed: int,
    backend: str,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC, insertion AUC) per image."""
    curves = {}
    for mode in ("deletion", "insertion"):
        fractions, curves[mode] = perturbation_curve(
            victim,
            images,
            maps,
            classes,
            mode=mode,
            steps=steps,
            baseline=baseline,
            generator=torch.Generator().manual_seed(seed),
            batch_size=batch_size,
        )
    if backend == "quantus":
        # Quantus refuses maps without an order (all values equal, e.g. withheld): those
        # keep the random order of the torch curve.
        flat = maps.reshape(maps.shape[0], -1)
        ordered = (flat != flat[:, :1]).any(dim=1)
        if ordered.any():
            curves["deletion"][ordered] = quantus_deletion_curve(
                victim,
                images[ordered],
                maps[ordered],
                classes[ordered],
                steps=steps,
                baseline=baseline,
            )
    return curve_area(fractions, curves["deletion"]), curve_area(fractions, curves["insertion"])


def _cell(value: dict[str, float]) -> str:
    if math.isnan(value["low"]):
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def utility_table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`explanation_utility`'s result: one row per defence, each
    cell the mean and its interval."""
    names = list(METRICS)
    arrows = {name: "↑" if METRICS[name][1] else "↓" for name in names}
    lines = [
        "| defence | " + " | ".join(f"{name} {arrows[name]}" for name in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for row in result["rows"]:
        lines.append(f"| {row['defense']} | " + " | ".join(_cell(row[n]) for n in names) + " |")
    return "\n".join(lines)
