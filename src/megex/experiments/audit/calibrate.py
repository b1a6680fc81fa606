"""Timing each method on the audited victim before the plan is fitted: one short run per
(threat model, method), its seconds per query kept in <out>/calibration.json so that a
resumed audit plans the same runs without timing them again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...runs import write_json_atomic
from ..common import log
from ..runner import run_one
from .jobs import calibration_job
from .plan import AuditPlan

__all__ = ["calibrate"]


def calibrate(
    plan: AuditPlan, planned: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], out: Path
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Seconds per query of each method of each threat model ({key: {method: seconds}}),
    and the calibration runs as the report lists them ({"<key>: <method>": {...}})."""
    path = out / "calibration.json"
    wanted = {tm.key: list(tm.methods) for tm in plan.threat_models}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("methods") == wanted:
            return kept["seconds_per_query"], kept["runs"]
    rates: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for tm in plan.threat_models:
        _, jobs = planned[tm.key]
        for method in tm.methods:
            job = calibration_job(tm, method, jobs, out)
            result = run_one({**job, "fresh": True})
            # The run's own time (its result.json's): the victim's loading and the worker's
            # start are the plan's fixed cost per run.
            rates.setdefault(tm.key, {})[method] = result["wall_s"] / job["budget"]
            runs[f"{tm.key}: {method}"] = {
                "seconds_per_query": rates[tm.key][method],
                "queries": job["budget"],
            }
            log(
                f"calibration: {tm.key} {method}: {job['budget']} queries in "
                f"{result['wall_s']:.1f} s"
            )
    write_json_atomic(path, {"methods": wanted, "seconds_per_query": rates, "runs": runs})
    return rates, runs
