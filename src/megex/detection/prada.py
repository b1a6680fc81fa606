"""PRADA (Juuti, Szyller, Marchal, Asokan, EuroS&P 2019): natural queries lie at distances
from each other that look normally distributed; a generator's queries (and near-duplicate
probes) do not, and a Shapiro-Wilk test on the distances tells them apart. The test needs
scipy (the ``data`` extra)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from ..settings import COUNT, COUNT_0, POSITIVE, Number, SettingError, override, setting
from .base import Measurement, Monitor

__all__ = ["PradaMonitor"]

_NEEDS_SCIPY = "PradaMonitor's Shapiro-Wilk test needs scipy: pip install 'megex[data]'"


@dataclass
class _GrowingSet:
    """One class's growing set: its members (projected) and the distances that admitted
    them (sum and sum of squares, for their mean and standard deviation)."""

    members: np.ndarray  # (stored, dims) float32
    admitted: int = 0
    dist_sum: float = 0.0
    dist_sq_sum: float = 0.0
    threshold: float = 0.0

    def admit(self, point: np.ndarray | None, distance: float, capacity: int) -> None:
        if point is not None and len(self.members) < capacity:
            self.members = np.concatenate([self.members, point[None]])
        self.admitted += 1
        self.dist_sum += distance
        self.dist_sq_sum += distance * distance
        mean = self.dist_sum / self.admitted
        std = math.sqrt(max(0.0, self.dist_sq_sum / self.admitted - mean * mean))
        # The admission threshold only rises (PRADA's T = max(T, mean - std)).
        self.threshold = max(self.threshold, mean - std)


@dataclass
class _PradaKey:
    window: int
    queries: int = 0
    flagged: bool = False
    safe_since: int = -1  # queries seen when a flagged key's statistic went safe; -1: not
    sets: dict[int, _GrowingSet] = field(default_factory=dict)
    # The latest `window` minimum distances and the classes they came from, as a ring.
    distances: np.ndarray = None  # type: ignore[assignment]
    classes: np.ndarray = None  # type: ignore[assignment]
    stored: int = 0  # distances ever recorded

    def __post_init__(self) -> None:
        if self.distances is None:
            self.distances = np.zeros(self.window, np.float64)
            self.classes = np.zeros(self.window, np.int64)

    def record(self, cls: int, distance: float) -> None:
        slot = self.stored % self.window
        self.distances[slot], self.classes[slot] = distance, cls
        self.stored += 1

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.stored, self.window)
        return self.distances[:n], self.classes[:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "flagged": self.flagged,
            "safe_since": self.safe_since,
            "stored": self.stored,
            "distances": torch.from_numpy(self.distances.copy()),
            "classes": torch.from_numpy(self.classes.copy()),
            "sets": [
                (
                    cls,
                    {
                        "members": torch.from_numpy(s.members.copy()),
                        "admitted": s.admitted,
                        "dist_sum": s.dist_sum,
                        "dist_sq_sum": s.dist_sq_sum,
                        "threshold": s.threshold,
                    },
                )
                for cls, s in self.sets.items()
            ],
        }

    def load_dict(self, saved: dict[str, Any]) -> None:
        self.queries, self.flagged = int(saved["queries"]), bool(saved["flagged"])
        self.safe_since = int(saved["safe_since"])
        self.stored = int(saved["stored"])
        self.distances = saved["distances"].numpy().astype(np.float64).copy()
        self.classes = saved["classes"].numpy().astype(np.int64).copy()
        if len(self.distances) != self.window:
            raise ValueError(
                f"state: {len(self.distances)} distances kept, this monitor keeps {self.window}"
            )
        self.sets = {
            int(cls): _GrowingSet(
                s["members"].numpy().astype(np.float32).copy(),
                int(s["admitted"]),
                float(s["dist_sum"]),
                float(s["dist_sq_sum"]),
                float(s["threshold"]),
            )
            for cls, s in saved["sets"]
        }


@dataclass(eq=False)
class PradaMonitor(Monitor):
    """PRADA (Juuti, Szyller, Marchal, Asokan, EuroS&P 2019), per key.

    Per key and per class predicted by the victim, a growing set of the key's queries. A new
    query's minimum L2 distance to the growing set of its class enters the distance set D
    (every query's, except the first of each class, which starts its set). The query joins
    the growing set when that distance exceeds the set's threshold T_c, which then becomes
    max(T_c, mean - std of the distances that admitted the set's members, the first member
    counting 0). Every `test_every` queries, D (the distances of classes that have at least
    `min_per_class` of them, values beyond `outlier_std` standard deviations from the mean
    left out) is tested with Shapiro-Wilk once it holds more than `min_distances` values;
    the statistic is W, and a key is flagged when W < threshold (the paper: about 0.9 to
    0.96 depending on the victim; calibrate it on your own benign traffic).

    Bounded memory and time, the simplifications of the paper:

    - images are compared after a fixed random projection to `projection_dim` dimensions
      (Gaussian, seeded by `seed`; it keeps L2 distances within a few per cent,
      Johnson-Lindenstrauss) when they have more pixels than that; 0 compares raw pixels;
    - a growing set keeps at most `max_stored_per_class` members: once full, it stops
      growing (its threshold too) and later queries are compared with the members it has;
    - D keeps the latest `max_distances` values (the paper's D grows without end; 5,000 is
      also the largest sample for which Shapiro-Wilk's p-value is reliable).

    Memory per key: classes x max_stored_per_class x dims x 4 bytes (10 classes, 512
    members, 256 dims: 5 MB) plus 16 bytes per kept distance. Time per query: the distances
    to the members of its class, O(max_stored_per_class x dims), plus one projection,
    O(pixels x dims), plus a Shapiro-Wilk test of O(max_distances log max_distances) every
    `test_every` queries.
    """

    name = "prada"
    flags_when = "below"
    # Queries whose distances are computed together (the pairwise block is chunk x chunk).
    _CHUNK = 256

    threshold: float | None = override(Monitor, "threshold", 0.9)
    _: KW_ONLY
    min_distances: int = setting(
        100, "D is tested once it holds more than this many distances", Number(3, whole=True)
    )
    min_per_class: int = setting(10, "distances a class needs for them to enter the test", COUNT)
    test_every: int = setting(10, "queries between two tests", COUNT)
    outlier_std: float = setting(
        3.0,
        "distances further than this many standard deviations from the mean are left out",
        POSITIVE,
    )
    max_stored_per_class: int = setting(512, "members a class's growing set keeps at most", COUNT)
    max_distances: int = setting(5000, "latest distances D keeps (more than min_distances)", COUNT)
    projection_dim: int = setting(
        256, "dimensions of the random projection images are compared in; 0: raw pixels", COUNT_0
    )
    seed: int = setting(0, "seed of the random projection", COUNT_0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if importlib.util.find_spec("scipy") is None:  # said now, not at the first test
            raise ModuleNotFoundError(_NEEDS_SCIPY, name="scipy")
        if self.max_distances <= self.min_distances:
            raise SettingError(
                f"monitor 'prada': max_distances: expected a whole number >= "
                f"{self.min_distances + 1}, got {self.max_distances!r}"
            )
        self._projection: np.ndarray | None = None
        self._pixels: int | None = None

    def _new_state(self) -> _PradaKey:
        return _PradaKey(window=self.max_distances)

    def _project(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        pixels = flat.shape[1]
        if self._pixels is None:
            self._pixels = pixels
            if 0 < self.projection_dim < pixels:
                gen = np.random.default_rng(self.seed)
                scale = 1.0 / math.sqrt(self.projection_dim)
                self._projection = (
                    gen.standard_normal((pixels, self.projection_dim)) * scale
                ).astype(np.float32)
        elif pixels != self._pixels:
            raise ValueError(
                f"images: {pixels} values per image, this monitor has seen {self._pixels}"
            )
        return flat if self._projection is None else flat @ self._projection

    def _update(self, state: _PradaKey, images: np.ndarray, probs: np.ndarray) -> list:
        z = self._project(images)
        classes = probs.argmax(axis=1)
        out: list[Measurement] = []
        for start in range(0, len(z), self._CHUNK):
            chunk, chunk_classes = (
                z[start : start + self._CHUNK],
                classes[start : start + self._CHUNK],
            )
            nearest = self._nearest(state, chunk, chunk_classes)
            for cls, distance in zip(chunk_classes.tolist(), nearest):
                state.queries += 1
                if distance is not None:
                    state.record(cls, distance)
                if state.queries % self.test_every == 0:
                    w = self._statistic(state)
                    if w is not None:
                        out.append(Measurement(state.queries, w))
        return out

    def _nearest(self, state: _PradaKey, z: np.ndarray, classes: np.ndarray) -> list[float | None]:
        """Each query's minimum distance to its class's growing set (None for a class's
        first query), admitting queries to the sets in order."""
        nearest: list[float | None] = [None] * len(z)
        for cls in np.unique(classes).tolist():
            rows = np.flatnonzero(classes == cls)
            points = z[rows].astype(np.float64)
            growing = state.sets.get(cls)
            old_min = None
            if growing is not None and len(growing.members):
                old_min = _min_distances(points, growing.members.astype(np.float64))
            among = _pairwise_distances(points)
            joined: list[int] = []  # positions in `rows` admitted during this chunk
            for j in range(len(rows)):
                candidates = []
                if old_min is not None:
                    candidates.append(old_min[j])
                if joined:
                    candidates.append(float(among[j, joined].min()))
                if growing is None:
                    # The class's first query starts its growing set.
                    growing = state.sets[cls] = _GrowingSet(points[j : j + 1].astype(np.float32))
                    growing.admit(None, 0.0, self.max_stored_per_class)
                    joined.append(j)
                    continue
                if not candidates:  # a set restored empty: nothing to compare with
                    candidates.append(math.inf)
                distance = float(min(candidates))
                nearest[rows[j]] = distance
                full = len(growing.members) >= self.max_stored_per_class
                if distance > growing.threshold and not full:
                    growing.admit(points[j].astype(np.float32), distance, self.max_stored_per_class)
                    joined.append(j)
        return nearest

    def _statistic(self, state: _PradaKey) -> float | None:
        distances, classes = state.recent()
        if len(distances) <= self.min_distances:
            return None
        counts = np.bincount(classes, minlength=1)
        kept = distances[counts[classes] >= self.min_per_class]
        if len(kept):
            mean, std = kept.mean(), kept.std()
            kept = kept[np.abs(kept - mean) <= self.outlier_std * std]
        if len(kept) <= self.min_distances:
            return None
        return _shapiro_w(kept)


def _min_distances(points: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Each point's smallest L2 distance to `members` (float64: near-duplicates stay apart)."""
    sq = (
        (points * points).sum(1)[:, None]
        + (members * members).sum(1)[None, :]
        - 2.0 * points @ members.T
    )
    return np.sqrt(np.maximum(sq.min(axis=1), 0.0))


def _pairwise_distances(points: np.ndarray) -> np.ndarray:
    norms = (points * points).sum(1)
    sq = norms[:, None] + norms[None, :] - 2.0 * points @ points.T
    return np.sqrt(np.maximum(sq, 0.0))


def _shapiro_w(values: np.ndarray) -> float:
    """Shapiro-Wilk's W; 1 for a sample without spread (no evidence either way)."""
    if float(np.ptp(values)) == 0.0:
        return 1.0
    try:
        from scipy.stats import shapiro  # an optional extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(_NEEDS_SCIPY, name="scipy") from err
    return float(shapiro(values).statistic)
