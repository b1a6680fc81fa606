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
from collections.abc import Sequence
from typing import Any

import torch

from ...defenses import Defense, build_defense
from ...explain import Explanation
from ...oracle import Answer, Responder, validate_images
from ...stats import mean_interval
from ...tables import markdown_table
from ...victim import Victim
from .maps import (
    cosine_similarity,
    curve_area,
    perturbation_curve,
    pixel_order,
    pixels_per_step,
    quantus_deletion_curve,
    spearman_correlation,
    top_k_count,
    top_k_overlap,
)

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
    _check_settings(images, steps, top_fraction, baseline, faithfulness)
    images = validate_images(images, victim.input_shape, "images")
    rows = [[]] + [_row(r) for r in defenses]
    reference, classes = _undefended(victim, images, explanation, seed, batch_size)
    settings = {
        "steps": steps,
        "top_fraction": top_fraction,
        "baseline": baseline,
        "seed": seed,
        "faithfulness": faithfulness,
        "level": level,
        "batch_size": batch_size,
    }
    out_rows = [
        _measure_row(victim, images, explanation, reference, classes, row, **settings)
        for row in rows
    ]
    return {
        "explanation": explanation.to_dict(),
        "images": images.shape[0],
        "steps": steps,
        "top_fraction": top_fraction,
        "top_k": top_k_count(math.prod(images.shape[1:]), top_fraction),  # of a map's values
        "baseline": baseline,
        "seed": seed,
        "faithfulness": faithfulness,
        "level": level,
        "rows": out_rows,
    }


def _undefended(
    victim: Victim, images: torch.Tensor, explanation: Explanation, seed: int, batch_size: int
) -> tuple[Answer, torch.Tensor]:
    """The undefended service's answer, and the class each image's map explains."""
    honest = Responder(victim, explanation=explanation, seed=seed, batch_size=batch_size)
    reference = honest.answer(images, explanation)
    labels = reference.labels
    classes = labels if not isinstance(explanation.target, int) else None
    if classes is None:
        classes = torch.full_like(labels, int(explanation.target))
    return reference, classes


def _measure_row(
    victim: Victim,
    images: torch.Tensor,
    explanation: Explanation,
    reference: Answer,
    classes: torch.Tensor,
    row: list[Defense],
    *,
    steps: int,
    top_fraction: float,
    baseline: float,
    seed: int,
    faithfulness: str,
    level: float,
    batch_size: int,
) -> dict[str, Any]:
    """One row of defences: its answers, then each measure's mean and interval over images."""
    answer = (
        reference
        if not row
        else Responder(
            victim, explanation=explanation, defenses=row, seed=seed, batch_size=batch_size
        ).answer(images, explanation)
    )
    ties = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    values = _similarity(reference.explanation, answer.explanation, n, top_fraction, ties)
    explained = _explained_maps(answer.explanation, classes)
    values["deletion_auc"], values["insertion_auc"] = _faithfulness(
        victim, images, explained, classes, steps, baseline, seed, faithfulness, batch_size
    )
    values.update(
        _prediction_change(reference.probabilities, answer.probabilities, reference.labels)
    )
    entry: dict[str, Any] = {"defense": _label(row), "specs": [d.spec() for d in row]}
    for name in METRICS:
        mean, low, high = mean_interval(values[name].tolist(), level=level, seed=seed)
        entry[name] = {"mean": mean, "low": low, "high": high}
    return entry


def _check_settings(
    images: torch.Tensor, steps: int, top_fraction: float, baseline: float, faithfulness: str
) -> None:
    """Refuse settings the measures cannot use, before any map is computed."""
    if faithfulness not in FAITHFULNESS_BACKENDS:
        raise ValueError(
            f"faithfulness: expected one of {', '.join(FAITHFULNESS_BACKENDS)}, "
            f"got {faithfulness!r}"
        )
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {top_fraction}")
    if not math.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline}")
    pixels_per_step(images.shape[-1] * images.shape[-2], steps)


def _similarity(
    reference: torch.Tensor,
    maps: torch.Tensor,
    n: int,
    top_fraction: float,
    ties: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Per image: cosine, Spearman and top-k overlap of the maps with the undefended ones."""
    per_map_ref = _flat_maps(reference)
    per_map = _flat_maps(maps)
    return {
        "cosine": _per_image(cosine_similarity(per_map_ref, per_map), n),
        "spearman": _per_image(spearman_correlation(per_map_ref, per_map), n),
        "top_k_overlap": _per_image(top_k_overlap(per_map_ref, per_map, top_fraction, ties), n),
    }


def _prediction_change(
    honest: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per image: the L1 distance of the returned probabilities to the honest ones, and
    whether the victim's predicted class keeps the largest."""
    return {
        "probability_l1": (probs - honest).abs().sum(dim=1),
        "label_kept": (probs.gather(1, labels.view(-1, 1)).squeeze(1) >= probs.amax(1)).float(),
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
    header = ["defence", *(f"{name} {arrows[name]}" for name in names)]
    rows = [[row["defense"], *(_cell(row[n]) for n in names)] for row in result["rows"]]
    return "\n".join(markdown_table(header, rows))
