"""Watching a service's query stream, per API key, for model-extraction traffic.

A :class:`Monitor` sees what each key sends (images, float32 in [0, 1], (N, C, H, W)) and
what the victim honestly answered (its probabilities, before any defence), and keeps a small
state per key. :meth:`Monitor.update` turns a batch into measurements of the monitor's
statistic (``queries_seen``, ``statistic``); :meth:`Monitor.observe` does the same and
returns a :class:`Flag` when a key's statistic crosses the threshold (once: the key is
flagged again only after its statistic has stayed on the safe side for `rearm` queries and
crosses again, so that a statistic wavering about the threshold is one flag). Two monitors:

- :class:`PradaMonitor`: PRADA (Juuti et al., EuroS&P 2019). Natural queries lie at
  distances from each other that look normally distributed; a generator's queries (and
  near-duplicate probes) do not, and a Shapiro-Wilk test on the distances tells them apart.
- :class:`OODMonitor`: how unlike the victim's training data the key's queries look to the
  victim, from its probabilities, averaged over the key's last queries.

Thresholds are chosen on benign traffic: :func:`calibrate` replays benign streams (validation
images held out of the victim's training split, never the test split) and picks the threshold
that flags at most a target fraction of them; :class:`Calibration` is the file a server
takes (``megex serve --monitor prada:calibration=FILE``).

In-process: :class:`MonitoredOracle` puts monitors in front of any Oracle (an attack run
under watch), :class:`RecordingOracle` records a run's queries as a :class:`QueryStream`,
and :func:`replay` feeds a recorded stream to a monitor. The Shapiro-Wilk test needs scipy
(the ``data`` extra); nothing else here needs more than torch and numpy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from .oracle import Answer, Oracle, OracleView
from .runs import write_json_atomic

__all__ = [
    "Calibration",
    "Flag",
    "Measurement",
    "Monitor",
    "MONITORS",
    "MonitoredOracle",
    "OODMonitor",
    "PradaMonitor",
    "QueryStream",
    "RecordingOracle",
    "build_monitor",
    "calibrate",
    "extreme",
    "first_crossing",
    "replay",
    "threshold_for_rate",
]


@dataclass(frozen=True)
class Flag:
    """A key whose statistic crossed its monitor's threshold, and when."""

    key: Hashable
    monitor: str
    statistic: float
    threshold: float
    queries_seen: int
    time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Measurement(NamedTuple):
    """The monitor's statistic for one key after its `queries_seen`-th query."""

    queries_seen: int
    statistic: float


def first_crossing(
    measurements: Iterable[Measurement], threshold: float, flags_when: str
) -> Measurement | None:
    """The first measurement past `threshold` ("below" or "above" it), or None."""
    for m in measurements:
        if _crosses(m.statistic, threshold, flags_when):
            return m
    return None


def _crosses(statistic: float, threshold: float | None, flags_when: str) -> bool:
    if threshold is None or math.isnan(statistic):
        return False
    return statistic < threshold if flags_when == "below" else statistic > threshold


# --- the base class -----------------------------------------------------------------------

_SAME = object()


class Monitor:
    """A query-stream monitor with a state per key.

    Subclasses set `name`, `flags_when` ("below": a small statistic is suspicious, "above": a
    large one), `PARAMS` (setting name -> type, the threshold excluded) and implement
    `_new_state` and `_update` (their key states carry `queries`, `flagged` and
    `safe_since`). threshold: None measures without ever flagging (what :func:`calibrate`
    replays with). rearm: queries a flagged key's statistic must stay on the safe side
    before a new crossing flags it again.
    """

    name: ClassVar[str] = "monitor"
    flags_when: ClassVar[str] = "below"
    PARAMS: ClassVar[dict[str, type]] = {}

    def __init__(self, threshold: float | None = None, rearm: int = 1000):
        _check_whole("rearm", rearm, 0)
        self.rearm = int(rearm)
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise ValueError(f"threshold: expected a number, got {threshold!r}")
            if not math.isfinite(threshold):
                raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
            threshold = float(threshold)
        self.threshold = threshold
        # What the threshold was calibrated on (Calibration.about), when it was.
        self.calibrated_on: dict[str, Any] = {}
        self._keys: dict[Hashable, Any] = {}

    # --- what a subclass provides ---------------------------------------------------------

    def _new_state(self) -> Any:
        raise NotImplementedError

    def _update(self, state: Any, images: np.ndarray, probabilities: np.ndarray) -> list:
        raise NotImplementedError

    # --- settings -------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The monitor's settings except its threshold (what a calibration was made with)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    def fresh(self, threshold: float | None | object = _SAME) -> Monitor:
        """A monitor with the same settings and no state, with this monitor's threshold or
        the one given (None: measure only)."""
        chosen = self.threshold if threshold is _SAME else threshold
        return type(self)(threshold=chosen, **self.params())

    def describe(self) -> dict[str, Any]:
        return {"monitor": self.name, "threshold": self.threshold, **self.params()}

    # --- watching -------------------------------------------------------------------------

    def update(self, key: Hashable, images: Any, probabilities: Any) -> list[Measurement]:
        """Take in one batch of `key`'s queries, in order; the measurements it produced."""
        x, p = _as_batch(images, probabilities)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = self._new_state()
        return self._update(state, x, p)

    def flags_for(self, key: Hashable, measurements: Sequence[Measurement]) -> list[Flag]:
        """Flags for `key`'s new measurements: one at its first crossing of the threshold,
        and again at a crossing after its statistic stayed on the safe side for `rearm`
        queries."""
        state = self._keys.get(key)
        if state is None or self.threshold is None:
            return []
        flags = []
        for m in measurements:
            if _crosses(m.statistic, self.threshold, self.flags_when):
                if not state.flagged:
                    flags.append(
                        Flag(
                            key, self.name, m.statistic, self.threshold, m.queries_seen, time.time()
                        )
                    )
                state.flagged, state.safe_since = True, -1
            elif state.flagged:
                if state.safe_since < 0:
                    state.safe_since = m.queries_seen
                if m.queries_seen - state.safe_since >= self.rearm:
                    state.flagged, state.safe_since = False, -1
        return flags

    def observe(self, key: Hashable, images: Any, probabilities: Any) -> list[Flag]:
        """Take in one batch of `key`'s queries; the flags it raised."""
        return self.flags_for(key, self.update(key, images, probabilities))

    def queries_seen(self, key: Hashable) -> int:
        state = self._keys.get(key)
        return 0 if state is None else state.queries

    def is_flagged(self, key: Hashable) -> bool:
        """Whether `key` has been flagged and not re-armed since."""
        state = self._keys.get(key)
        return bool(state is not None and state.flagged)

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def forget(self, key: Hashable) -> None:
        """Drop `key`'s state (its history starts over)."""
        self._keys.pop(key, None)

    # --- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Settings and every key's state, as tensors and plain values
        (``torch.save``-able and readable with ``weights_only=True``)."""
        return {
            "monitor": self.name,
            "threshold": self.threshold,
            "params": self.params(),
            "keys": [(key, state.to_dict()) for key, state in self._keys.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the keys' states saved by a monitor with the same settings."""
        if state.get("monitor") != self.name:
            raise ValueError(f"state: saved by monitor {state.get('monitor')!r}, not {self.name!r}")
        if state.get("params") != self.params():
            raise ValueError(
                f"state: saved with settings {state.get('params')}, this monitor has "
                f"{self.params()}"
            )
        keys = {}
        for key, saved in state["keys"]:
            fresh = self._new_state()
            fresh.load_dict(saved)
            keys[key] = fresh
        self._keys = keys


def _as_batch(images: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_array(images, "images", np.float32)
    p = _as_array(probabilities, "probabilities", np.float64)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {x.shape}")
    if p.ndim != 2 or p.shape[0] != x.shape[0]:
        raise ValueError(
            f"probabilities: expected ({x.shape[0]}, K) for {x.shape[0]} images, got {p.shape}"
        )
    return x, p


def _as_array(value: Any, name: str, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.float32)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False)
    raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(value).__name__}")


# --- PRADA --------------------------------------------------------------------------------


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
    PARAMS = {
        "min_distances": int,
        "min_per_class": int,
        "test_every": int,
        "outlier_std": float,
        "max_stored_per_class": int,
        "max_distances": int,
        "projection_dim": int,
        "seed": int,
        "rearm": int,
    }
    # Queries whose distances are computed together (the pairwise block is chunk x chunk).
    _CHUNK = 256

    def __init__(
        self,
        threshold: float | None = 0.9,
        *,
        min_distances: int = 100,
        min_per_class: int = 10,
        test_every: int = 10,
        outlier_std: float = 3.0,
        max_stored_per_class: int = 512,
        max_distances: int = 5000,
        projection_dim: int = 256,
        seed: int = 0,
        rearm: int = 1000,
    ):
        super().__init__(threshold, rearm)
        if importlib.util.find_spec("scipy") is None:  # said now, not at the first test
            raise ModuleNotFoundError(
                "PradaMonitor's Shapiro-Wilk test needs scipy: pip install 'megex[data]'",
                name="scipy",
            )
        for name, value, low in (
            ("min_distances", min_distances, 3),
            ("min_per_class", min_per_class, 1),
            ("test_every", test_every, 1),
            ("max_stored_per_class", max_stored_per_class, 1),
            ("projection_dim", projection_dim, 0),
            ("seed", seed, 0),
        ):
            _check_whole(name, value, low)
        _check_whole("max_distances", max_distances, int(min_distances) + 1)
        if isinstance(outlier_std, bool) or not float(outlier_std) > 0:
            raise ValueError(f"outlier_std: expected a number > 0, got {outlier_std!r}")
        self.min_distances = int(min_distances)
        self.min_per_class = int(min_per_class)
        self.test_every = int(test_every)
        self.outlier_std = float(outlier_std)
        self.max_stored_per_class = int(max_stored_per_class)
        self.max_distances = int(max_distances)
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
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
        from scipy.stats import shapiro
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "PradaMonitor's Shapiro-Wilk test needs scipy: pip install 'megex[data]'",
            name="scipy",
        ) from err
    return float(shapiro(values).statistic)


# --- out of distribution ------------------------------------------------------------------


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
    PARAMS = {"score": str, "window": int, "rearm": int}

    def __init__(
        self,
        threshold: float | None = None,
        *,
        score: str = "msp",
        window: int = 100,
        rearm: int = 1000,
    ):
        super().__init__(threshold, rearm)
        if score not in OOD_SCORES:
            raise ValueError(f"score: expected one of {', '.join(OOD_SCORES)}, got {score!r}")
        _check_whole("window", window, 1)
        self.score = score
        self.window = int(window)

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


def _check_whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}: expected a whole number >= {low}, got {value!r}")


MONITORS: dict[str, type[Monitor]] = {"prada": PradaMonitor, "ood": OODMonitor}


# --- thresholds from benign traffic -------------------------------------------------------


@dataclass
class QueryStream:
    """One client's queries in order: images (N, C, H, W) float32 in [0, 1] and the
    victim's honest probabilities (N, K)."""

    images: torch.Tensor
    probabilities: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.probabilities.dim() != 2:
            raise ValueError(
                f"stream {self.name!r}: expected images (N, C, H, W) and probabilities "
                f"(N, K), got {tuple(self.images.shape)} and {tuple(self.probabilities.shape)}"
            )
        if len(self.images) != len(self.probabilities):
            raise ValueError(
                f"stream {self.name!r}: {len(self.images)} images but "
                f"{len(self.probabilities)} rows of probabilities"
            )

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_victim(cls, victim: Any, images: torch.Tensor, name: str = "") -> QueryStream:
        """A stream of `images` with the probabilities `victim` (logits out) gives them."""
        images = images.detach().to("cpu", torch.float32)
        device = next(iter(victim.parameters()), torch.empty(0)).device
        parts = []
        with torch.no_grad():
            was_training = victim.training
            victim.eval()
            for i in range(0, len(images), 1024):
                logits = victim(images[i : i + 1024].to(device))
                parts.append(torch.softmax(logits.float().cpu(), dim=1))
            victim.train(was_training)
        return cls(images, torch.cat(parts), name)


def replay(
    monitor: Monitor, stream: QueryStream, key: Hashable = "replay", batch_size: int = 256
) -> list[Measurement]:
    """Feed `stream` to `monitor` as `key`'s queries, `batch_size` at a time; every
    measurement it produced (the key's state stays in the monitor)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    out: list[Measurement] = []
    for i in range(0, len(stream), batch_size):
        out += monitor.update(
            key, stream.images[i : i + batch_size], stream.probabilities[i : i + batch_size]
        )
    return out


def extreme(measurements: Sequence[Measurement], flags_when: str) -> float | None:
    """The most suspicious statistic of a stream (None: it was never measured)."""
    values = [m.statistic for m in measurements if not math.isnan(m.statistic)]
    if not values:
        return None
    return min(values) if flags_when == "below" else max(values)


def threshold_for_rate(extremes: Sequence[float | None], flags_when: str, rate: float) -> float:
    """The threshold that flags at most a fraction `rate` of the streams whose most
    suspicious statistics are `extremes` (None: never measured, never flagged)."""
    if not 0 <= rate < 1:
        raise ValueError(f"target false-positive rate: expected in [0, 1), got {rate}")
    measured = [e for e in extremes if e is not None]
    if not measured:
        raise ValueError(
            "calibration: no benign stream was long enough to be measured; use longer streams"
        )
    allowed = math.floor(rate * len(extremes) + 1e-9)
    # The (allowed)-th most suspicious value: strictly past it lie at most `allowed` streams.
    order = sorted(measured, reverse=flags_when == "above")
    return float(order[min(allowed, len(order) - 1)])


@dataclass
class Calibration:
    """A threshold chosen on benign streams for a target false-positive rate (per stream:
    the fraction of benign keys flagged within `stream_queries` queries)."""

    monitor: str
    params: dict[str, Any]
    threshold: float
    target_fpr: float
    streams: int
    stream_queries: int
    calibration_fpr: float
    extremes: list[float | None] = field(default_factory=list)
    about: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> Monitor:
        """The monitor with these settings and this threshold."""
        if self.monitor not in MONITORS:
            raise ValueError(
                f"calibration: unknown monitor {self.monitor!r}; expected one of "
                f"{', '.join(MONITORS)}"
            )
        cls = MONITORS[self.monitor]
        unknown = sorted(set(self.params) - set(cls.PARAMS))
        if unknown:
            raise ValueError(
                f"calibration: {self.monitor} has no setting {unknown[0]!r}; expected "
                f"{', '.join(cls.PARAMS)}"
            )
        monitor = cls(threshold=self.threshold, **self.params)
        monitor.calibrated_on = dict(self.about)
        return monitor

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            doc = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"calibration {path}: not JSON ({err})") from None
        needed = {"monitor", "params", "threshold", "target_fpr"}
        if not isinstance(doc, dict) or not needed <= set(doc):
            raise ValueError(
                f"calibration {path}: expected a JSON object with {', '.join(sorted(needed))}"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


def calibrate(
    monitor: Monitor,
    streams: Iterable[QueryStream],
    target_fpr: float,
    about: dict[str, Any] | None = None,
) -> Calibration:
    """The threshold for `monitor`'s settings that flags at most `target_fpr` of the benign
    `streams` (each replayed as one key, from a fresh state). Use validation images held out
    of the victim's training split, never the test split a result is reported on."""
    extremes, longest = [], 0
    for stream in streams:
        watcher = monitor.fresh(threshold=None)
        extremes.append(extreme(replay(watcher, stream), monitor.flags_when))
        longest = max(longest, len(stream))
    if not extremes:
        raise ValueError("calibration: no benign streams given")
    threshold = threshold_for_rate(extremes, monitor.flags_when, target_fpr)
    flagged = sum(e is not None and _crosses(e, threshold, monitor.flags_when) for e in extremes)
    return Calibration(
        monitor=monitor.name,
        params=monitor.params(),
        threshold=threshold,
        target_fpr=float(target_fpr),
        streams=len(extremes),
        stream_queries=longest,
        calibration_fpr=flagged / len(extremes),
        extremes=extremes,
        about=dict(about or {}),
    )


# --- monitors by name ---------------------------------------------------------------------


def build_monitor(spec: str) -> Monitor:
    """A monitor from 'name' or 'name:param=value,...', e.g. 'prada', 'prada:threshold=0.92',
    'ood:threshold=0.4,window=200,score=entropy' or 'ood:calibration=FILE' (a file written by
    :meth:`Calibration.save`, whose settings and threshold it takes)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in MONITORS:
        raise ValueError(f"monitor: unknown {name!r}; expected one of {', '.join(MONITORS)}")
    cls = MONITORS[name]
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"monitor {name!r}: expected param=value, got {part!r}")
        if key in given:
            raise ValueError(f"monitor {name!r}: {key} given twice")
        given[key] = value.strip()
    allowed = ["threshold", "calibration", *cls.PARAMS]
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ValueError(
            f"monitor {name!r}: unknown parameter {unknown[0]!r}; expected one of "
            f"{', '.join(allowed)}"
        )
    if "calibration" in given:
        others = sorted(set(given) - {"calibration"})
        if others:
            raise ValueError(
                f"monitor {name!r}: calibration=FILE sets the threshold and the settings it "
                f"was calibrated with; drop {', '.join(others)}"
            )
        calibration = Calibration.load(given["calibration"])
        if calibration.monitor != name:
            raise ValueError(
                f"monitor {name!r}: {given['calibration']} calibrates monitor "
                f"{calibration.monitor!r}"
            )
        return calibration.build()
    kwargs: dict[str, Any] = {}
    for key, text in given.items():
        kind = float if key == "threshold" else cls.PARAMS[key]
        kwargs[key] = _parse_value(name, key, text, kind)
    return cls(**kwargs)


def _parse_value(monitor: str, key: str, text: str, kind: type) -> Any:
    if kind is str:
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"monitor {monitor!r}: {key}: expected a number, got {text!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"monitor {monitor!r}: {key}: expected a whole number, got {text!r}")
        return int(number)
    return number


# --- in-process use -----------------------------------------------------------------------


class RecordingOracle(OracleView):
    """An Oracle that passes every query on and records its images and the probabilities
    returned, in order (:meth:`stream`). The probabilities are the answer's: the honest
    ones when the oracle returns probabilities without a defence of them."""

    def __init__(self, oracle: Oracle):
        super().__init__(oracle)
        self._images: list[torch.Tensor] = []
        self._probabilities: list[torch.Tensor] = []

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        answer = self.oracle.query(x, explanation=explanation)
        self._images.append(torch.as_tensor(x).detach().to("cpu", torch.float32).clone())
        self._probabilities.append(answer.probabilities.detach().to("cpu", torch.float32))
        return answer

    def stream(self, name: str = "") -> QueryStream:
        """Every query so far, in order."""
        if not self._images:
            c, h, w = self.input_shape
            return QueryStream(torch.zeros(0, c, h, w), torch.zeros(0, self.num_classes), name)
        return QueryStream(torch.cat(self._images), torch.cat(self._probabilities), name)


class MonitoredOracle(OracleView):
    """An Oracle under watch: every answered query is shown to `monitors` as `key`'s.

    probabilities: computes the honest probabilities of a batch of images (e.g.
    ``lambda x: torch.softmax(victim(x), 1)``); None uses the answer's, which are the honest
    ones when the oracle returns probabilities without a defence of them. `flags` collects
    every flag raised and `measurements` each monitor's measurements, so that an attack run
    through this oracle can be scored (was it flagged, after how many queries).
    """

    def __init__(
        self,
        oracle: Oracle,
        monitors: Sequence[Monitor],
        key: Hashable = "client",
        probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        names = [m.name for m in monitors]
        if len(set(names)) != len(names):
            raise ValueError(f"monitors: each kind once, got {names}")
        super().__init__(oracle)
        self.monitors = list(monitors)
        self.key = key
        self.probabilities = probabilities
        self.flags: list[Flag] = []
        self.measurements: dict[str, list[Measurement]] = {m.name: [] for m in monitors}

    @property
    def flagged(self) -> bool:
        """Whether any monitor has flagged the key so far."""
        return bool(self.flags)

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        answer = self.oracle.query(x, explanation=explanation)
        images = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if self.probabilities is None:
            probs = answer.probabilities
        else:
            with torch.no_grad():
                probs = self.probabilities(images)
        for monitor in self.monitors:
            measured = monitor.update(self.key, images, probs)
            self.measurements[monitor.name] += measured
            self.flags += monitor.flags_for(self.key, measured)
        return answer

    def first_flag(self) -> Flag | None:
        """The earliest flag by queries seen, or None."""
        return min(self.flags, key=lambda f: f.queries_seen, default=None)
