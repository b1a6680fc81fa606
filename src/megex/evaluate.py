"""Measuring a clone: accuracy on labelled data, fidelity (agreement with the victim).

The evaluator works outside the oracle's ledger: it is the auditor's view, computed from a
test set and the victim's own labels on it, never from attack queries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Evaluator", "accuracy", "agreement", "queries_to_reach"]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = [
        model(x[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on [0, 1] images `x` with labels `y`."""
    return float((predict(model, x) == y).float().mean())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree."""
    return float((a == b).float().mean())


class Evaluator:
    """Clone accuracy and fidelity on a fixed test set.

    victim_labels: the victim's predictions on `x` (e.g. ``victim.predict(x)``); without
    them fidelity is not reported.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        victim_labels: torch.Tensor | None = None,
        victim_accuracy: float | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"evaluator: {len(x)} images but {len(y)} labels")
        if victim_labels is not None and len(victim_labels) != len(y):
            raise ValueError(f"evaluator: {len(victim_labels)} victim labels for {len(y)} images")
        self.x, self.y = x, y
        self.victim_labels = victim_labels
        if victim_accuracy is None and victim_labels is not None:
            victim_accuracy = agreement(victim_labels, y)
        self.victim_accuracy = victim_accuracy

    @classmethod
    def from_victim(cls, victim: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluator:
        labels = predict(victim, x)
        return cls(x, y, labels, agreement(labels, y))

    def __call__(self, clone: nn.Module) -> dict[str, Any]:
        pred = predict(clone, self.x)
        out: dict[str, Any] = {"clone_accuracy": agreement(pred, self.y)}
        if self.victim_labels is not None:
            out["fidelity"] = agreement(pred, self.victim_labels)
        if self.victim_accuracy:
            out["ratio"] = out["clone_accuracy"] / self.victim_accuracy
        return out


def queries_to_reach(metrics: list[dict[str, Any]], target_accuracy: float) -> int | None:
    """The first evaluated query count at which clone accuracy reached `target_accuracy`."""
    for row in metrics:
        if row.get("clone_accuracy", -1.0) >= target_accuracy:
            return int(row["queries"])
    return None
