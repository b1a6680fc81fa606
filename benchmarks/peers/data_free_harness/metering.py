"""Counting the peers' queries: the budget, the victim every peer is shown, the evaluations.

- The victim: ours, behind a module that counts every image it is shown and refuses a
  request that would pass the budget (the count in the table is that module's, not the
  peer's; the peer's own count is kept beside it).
- Budgets: the peers' loops check the budget themselves (mebench) or count it themselves (the
  authors' code, which stops when an iteration no longer fits); a request past it is refused
  whole, uncounted. Each peer runs to the largest budget; the smaller ones are read on the
  way, as ours are.
- Evaluation: on our test split, of the model the peer reports, at each budget: just before
  the request that would pass it, and at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megex.evaluate import Evaluator
from megex.victim import Victim


class BudgetReached(Exception):
    """A peer asked for more images than its budget has left: refused whole, uncounted."""


class QueryMeter:
    """The budget of one peer's run, counted image by image, with the evaluations at marks.

    `evaluate` is called with no arguments just before the first request that would take the
    count past a mark (the clone has then learnt from every query up to the mark), and by
    :meth:`finish` for the marks left at the end.
    """

    def __init__(self, budget: int, marks: Sequence[int]):
        self.budget = int(budget)
        self.marks = sorted({int(m) for m in marks})
        self.count = 0
        self.evaluate: Callable[[], dict[str, Any]] | None = None
        self.rows: dict[int, dict[str, Any]] = {}
        self.evaluation_s = 0.0
        self.pixel_min = math.inf
        self.pixel_max = -math.inf

    def before(self, n: int) -> None:
        for mark in self.marks:
            if mark not in self.rows and self.count + n > mark:
                self._evaluate_at(mark)
        if self.count + n > self.budget:
            raise BudgetReached(f"{n} images asked with {self.budget - self.count} left")

    def after(self, images: torch.Tensor) -> None:
        self.count += int(images.shape[0])
        if images.numel():
            self.pixel_min = min(self.pixel_min, float(images.min()))
            self.pixel_max = max(self.pixel_max, float(images.max()))

    def finish(self) -> None:
        for mark in self.marks:
            if mark not in self.rows:
                self._evaluate_at(mark)

    def _evaluate_at(self, mark: int) -> None:
        if self.evaluate is None:
            raise RuntimeError("the peer queried before its clone could be evaluated")
        start = time.perf_counter()
        scores = self.evaluate()
        self.evaluation_s += time.perf_counter() - start
        self.rows[mark] = {"budget": mark, "queries": self.count, **scores}


class CountedVictim(nn.Module):
    """Our victim as a peer's teacher: log-probabilities, every image counted by `meter`."""

    def __init__(self, victim: Victim, meter: QueryMeter):
        super().__init__()
        self.victim = victim.eval()
        self.meter = meter
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.meter.before(int(x.shape[0]))
        start = time.perf_counter()
        with torch.no_grad():
            out = F.log_softmax(self.victim(x.detach().float().cpu()), dim=1)
        self.seconds += time.perf_counter() - start
        self.meter.after(x.detach())
        return out


def _modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def clone_scores(model: nn.Module, evaluator: Evaluator) -> dict[str, Any]:
    """The evaluator's figures for `model`, every submodule's train/eval mode kept."""
    modes = _modes(model)
    try:
        with torch.no_grad():
            scores = evaluator(model)
    finally:
        for module, training in modes:
            module.training = training
    return {k: scores[k] for k in ("clone_accuracy", "fidelity") if k in scores}


def finished_peer_row(
    meter: QueryMeter, counted: CountedVictim, wall_s: float, stopped: str | None
) -> dict[str, Any]:
    """A peer's run as a row: the evaluations at every mark, the counts and the rates."""
    meter.finish()
    train_s = max(wall_s - meter.evaluation_s, 1e-9)
    return {
        "evaluations": [meter.rows[m] for m in meter.marks],
        "queries_counted": meter.count,
        "query_pixels": [meter.pixel_min, meter.pixel_max] if meter.count else None,
        "wall_s": round(wall_s, 3),
        "evaluation_s": round(meter.evaluation_s, 3),
        "victim_s": round(counted.seconds, 3),
        "queries_per_s": round(meter.count / train_s, 1),
        **({"stopped": stopped} if stopped else {}),
    }
