"""Out of distribution: how unlike the victim's training data a key's queries look to the
victim, from its probabilities, averaged over the key's last queries."""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import torch

from ..settings import COUNT, Choice, setting
from .base import Measurement, Monitor

__all__ = ["OOD_SCORES", "OODMonitor"]


@dataclass
class _OODKey:
    window: int
    queries: int = 0
    flagged: bool = False
    safe_since: int = -1  # queries seen when a flagged key's statistic went safe; -1: not
    scores: np.ndarray = None  # type: ignore[assignment]  # the latest `window`, oldest first

    def __post_init__(self) -> None:
        if self.scores is None:
            self.scores = np.zeros(0, np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "flagged": self.flagged,
            "safe_since": self.safe_since,
            "scores": torch.from_numpy(self.scores.copy()),
        }

    def load_dict(self, saved: dict[str, Any]) -> None:
        self.queries, self.flagged = int(saved["queries"]), bool(saved["flagged"])
        self.safe_since = int(saved["safe_since"])
        self.scores = saved["scores"].numpy().astype(np.float64)[-self.window :].copy()


OOD_SCORES = ("msp", "entropy")


@dataclass(eq=False)
class OODMonitor(Monitor):
    """How far from the victim's training data a key's queries look, from the victim's
    probabilities, averaged over the key's last `window` queries.

    score: "msp", one minus the largest probability (Hendrycks and Gimpel, ICLR 2017: the
    baseline of out-of-distribution detection; in [0, 1 - 1/K]), or "entropy", the entropy
    of the probabilities divided by log K (in [0, 1]; it reads the whole vector, not only
    the top class). Only probabilities are used: the energy score (Liu et al., NeurIPS
    2020) needs logits, which a service that hands its monitors probabilities (as this
    one does) does not keep. A key gets a measurement after each query once it has sent
    `window` queries: the mean score of its last `window` queries; it is flagged when the
    mean exceeds the threshold. No default threshold: the scale depends on the victim, so
    choose it with :func:`calibrate` (None: measure only).

    Memory per key: `window` floats. Time per query: O(K).
    """

    name = "ood"
    flags_when = "above"

    _: KW_ONLY
    score: str = setting("msp", "per-query score: 'msp' or 'entropy'", Choice(OOD_SCORES))
    window: int = setting(100, "queries whose scores are averaged", COUNT)

    def _new_state(self) -> _OODKey:
        return _OODKey(window=self.window)

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        """Each query's score, from its (N, K) probabilities."""
        p = np.clip(probabilities, 0.0, None)
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        if self.score == "msp":
            return 1.0 - p.max(axis=1)
        k = p.shape[1]
        if k < 2:
            return np.zeros(len(p))
        logs = np.log(np.where(p > 0, p, 1.0))
        return -(p * logs).sum(axis=1) / math.log(k)

    def _update(self, state: _OODKey, images: np.ndarray, probs: np.ndarray) -> list:
        new = self.scores(probs)
        joined = np.concatenate([state.scores, new])
        sums = np.concatenate([[0.0], np.cumsum(joined)])
        step = np.arange(1, len(new) + 1)
        seen = state.queries + step  # each query's count
        ends = len(state.scores) + step  # and where its window ends in `joined`
        ready = seen >= self.window
        means = (sums[ends[ready]] - sums[ends[ready] - self.window]) / self.window
        state.queries += len(new)
        state.scores = joined[-self.window :].copy()
        return [Measurement(int(q), float(m)) for q, m in zip(seen[ready], means)]
