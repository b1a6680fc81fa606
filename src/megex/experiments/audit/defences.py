"""What each defence costs the victim's honest users, measured on its test images: the
top-1 accuracy of the answers they get, and how close the maps they get are to the honest
ones (megex.experiments.utility)."""

from __future__ import annotations

from typing import Any

import torch

from ... import data as data_mod
from ...defenses import build_defense
from ...explain import Explanation
from ...oracle import LocalOracle
from ...victim import Victim
from ..utility import explanation_utility
from .victims import AuditTarget

__all__ = ["UTILITY_IMAGES", "served_utility"]

# Test images the maps are compared on (the accuracy is on the whole test split).
UTILITY_IMAGES = 500


def served_utility(
    target: AuditTarget, specs: tuple[str, ...] | list[str], data_root: str | None
) -> dict[str, dict[str, Any]]:
    """Per defence: {"served_accuracy", "accuracy_change", "map_cosine"} (map_cosine None
    for a defence of the predictions alone, whose maps are the honest ones)."""
    victim = Victim.load(target.location)
    x, y = data_mod.load(target.dataset, data_root).test_tensors()
    honest = _served_accuracy(victim, x, y, [])
    maps = explanation_utility(
        victim,
        x[:UTILITY_IMAGES],
        [[spec] for spec in specs],
        Explanation("gradient", target="predicted"),
        seed=0,
    )
    out = {}
    for spec, row in zip(specs, maps["rows"][1:]):
        defense = build_defense(spec)
        accuracy = _served_accuracy(victim, x, y, [defense])
        out[spec] = {
            "served_accuracy": accuracy,
            "accuracy_change": accuracy - honest,
            "map_cosine": row["cosine"]["mean"] if defense.side == "explanation" else None,
        }
    return out


@torch.no_grad()
def _served_accuracy(victim: Victim, x: torch.Tensor, y: torch.Tensor, defenses: list) -> float:
    """Top-1 accuracy of the labels the service answers (after `defenses`)."""
    oracle = LocalOracle(victim, explanation=None, defenses=defenses, seed=0)
    labels = torch.cat(
        [oracle.query(x[i : i + 1024]).probabilities.argmax(1) for i in range(0, len(x), 1024)]
    )
    return float((labels == y).float().mean())
