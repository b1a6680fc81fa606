"""Thresholds from benign traffic: :func:`calibrate` replays benign streams (validation
images held out of the victim's training split, never the test split) and picks the
threshold that flags at most a target fraction of them; :class:`Calibration` is the file a
server takes (``megex serve --monitor prada:calibration=FILE``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..runs import write_json_atomic
from .base import Measurement, Monitor, crosses
from .registry import MONITORS
from .streams import QueryStream, replay

__all__ = ["Calibration", "calibrate", "extreme", "threshold_for_rate"]


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
    flagged = sum(e is not None and crosses(e, threshold, monitor.flags_when) for e in extremes)
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
