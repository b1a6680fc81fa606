"""What the query monitors see of the audit's attackers: PRADA and the out-of-distribution
monitor (megex.detection), their thresholds calibrated on benign streams of the victim's own
images, each replaying the queries of one run of every attacker (attack seed 0).

Benign streams draw from the images the victim held out of its training (its validation
images) when it has them, else from its test split (the clone accuracies are measured there
too, but a monitor's threshold does not touch an attack). A benign stream holds distinct
images, so its length is at most the number of those images; an attack stream is scored up
to `queries` (the report says both).
"""

from __future__ import annotations

import statistics
from typing import Any

from ... import data as data_mod
from ...detection import MONITORS, calibrate
from ...victim import Victim
from ..common import log
from ..detection.config import DEFAULTS as DETECTION_DEFAULTS
from ..detection.streams import attack_stream, benign_stream, score_stream
from .plan import AuditPlan

__all__ = ["MONITOR_QUERIES", "watch"]

# Queries of each attack stream scored: where the benchmark's monitors decided (docs/results/
# detection.md: PRADA flags DFME within 5k queries; OOD at its first window).
MONITOR_QUERIES = 5000
CALIBRATION_STREAMS = 10
# The detection benchmark's benign clients (noise and augmentation settings).
BENIGN = {k: DETECTION_DEFAULTS[k] for k in ("noise_std", "augment")}


def watch(
    plan: AuditPlan, victim_path: str, data_root: str | None, seeds: int = 1
) -> dict[str, Any]:
    """Each monitor's verdict on each attacker of each threat model: the summary's
    "monitors" block."""
    victim = Victim.load(victim_path)
    images, source = _benign_images(victim, data_root)
    length = min(MONITOR_QUERIES, len(images))
    streams = [
        benign_stream(images, victim, kind, length, 1_000_000 + i, BENIGN)
        for kind in ("clean", "noise", "augment")
        for i in range(CALIBRATION_STREAMS)
    ]
    monitors = {name: cls() for name, cls in MONITORS.items()}
    calibrations = {(name, 0): calibrate(m, streams, 0.05) for name, m in monitors.items()}
    rows = []
    for tm in plan.threat_models:
        queries = min(MONITOR_QUERIES, tm.top)
        for method in tm.methods:
            hits: dict[str, list[int | None]] = {name: [] for name in monitors}
            for seed in range(seeds):
                stream = attack_stream(
                    method, tm.attacks[method], tm.settings[method], seed, victim, queries,
                    "cpu", tm.pool, data_root,
                )  # fmt: skip
                scored = score_stream(stream, monitors, calibrations, 0)
                for name, r in scored["monitors"].items():
                    hits[name].append(r["detected_at"])
            for name, found in hits.items():
                flagged = [q for q in found if q is not None]
                rows.append(
                    {
                        "monitor": name,
                        "threat_model": tm.key,
                        "method": method,
                        "flagged_runs": len(flagged),
                        "runs": len(found),
                        "median_first_flag_queries": statistics.median(flagged)
                        if flagged
                        else None,
                        "queries": queries,
                    }
                )
            log(f"monitors: {tm.key} {method}: " + ", ".join(
                f"{n} {'at ' + str(v[0]) if v[0] is not None else 'no'}" for n, v in hits.items()
            ))  # fmt: skip
    note = (
        f"Thresholds flag at most 5% of {len(streams)} benign streams of {length} queries "
        f"(clean, noisy and shifted {source}); each attacker's first "
        f"{min(MONITOR_QUERIES, max(tm.top for tm in plan.threat_models))} queries or fewer "
        f"(its budget), attack seed{'s' if seeds > 1 else ''} {', '.join(map(str, range(seeds)))}."
    )
    return {"rows": rows, "note": note}


def _benign_images(victim: Victim, data_root: str | None) -> tuple[Any, str]:
    """The victim's held-out training images if it has any, else its test images."""
    ds = data_mod.load(victim.info()["dataset"], data_root)
    held = int(victim.info().get("validation_images") or 0)
    if held:
        return ds.validation_tensors(held)[0], f"held-out images of the victim ({held})"
    x = ds.test_tensors()[0]
    return x, f"test images ({len(x)})"
