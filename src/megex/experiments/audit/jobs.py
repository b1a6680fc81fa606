"""The audit's run jobs: the benchmark's jobs for each threat model on the audited victim
(megex.experiments.query_efficiency.plan, so that a run is the benchmark's run), the
defended runs at each threat model's largest budget, and the short calibration runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..query_efficiency import plan as bench_plan
from ..tradeoff.rows import slug
from .plan import AuditPlan, ThreatModel
from .threats import for_threat_model
from .victims import AuditTarget

__all__ = ["bench_args", "calibration_job", "defence_jobs", "threat_model_jobs"]


def bench_args(
    tm: ThreatModel, seeds: list[int], data_root: str | None, jobs: int, progress: bool
) -> argparse.Namespace:
    """The benchmark's options for one threat model's runs."""
    return argparse.Namespace(
        budgets=None,
        quick=False,
        seeds=list(seeds),
        methods=[tm.baseline, tm.attacker],
        device=None,
        data_root=data_root,
        jobs=jobs,
        no_progress=not progress,
        ray=None,
        threads=1,
        fresh=False,
        retries=2,
    )


def _targeted(job: dict[str, Any], target: AuditTarget) -> dict[str, Any]:
    """A job against the audited victim (a URL's jobs carry its key, its answers file and
    how to speak to it)."""
    job["victim"] = target.location
    if target.kind == "url":
        job["api_key"] = target.api_key
        job["victim_answers"] = target.answers
        job["client"] = target.client_options()
    return job


def threat_model_jobs(
    tm: ThreatModel,
    target: AuditTarget,
    seeds: list[int],
    out: Path,
    data_root: str | None,
    jobs: int,
    progress: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(benchmark config, jobs) of one threat model's undefended runs, under out/<key>/."""
    config = for_threat_model(tm, target.dataset, seeds, target.held_out_for_pools)
    args = bench_args(tm, seeds, data_root, jobs, progress)
    # The plan resolves a victim path; a URL's jobs get it back in _targeted.
    where = target.location if target.kind == "file" else out / "served"
    planned = bench_plan(config, args, out / tm.key, {0: where})
    return config, [_targeted(job, target) for job in planned]


def defence_jobs(
    plan: AuditPlan, tm: ThreatModel, undefended: list[dict[str, Any]], out: Path
) -> list[dict[str, Any]]:
    """Each defence's runs at the threat model's largest budget: the map attacker's, and the
    baseline's under a defence that changes the predictions."""
    tops = [j for j in undefended if j["budget"] == tm.top]
    jobs = []
    for spec in plan.defenses:
        methods = tm.methods if spec in plan.prediction_defenses else (tm.attacker,)
        for job in tops:
            if job["method"] not in methods:
                continue
            jobs.append(
                {
                    **job,
                    "defenses": [spec],
                    "defense": spec,
                    "budgets": [tm.top],
                    "eval_at": [],
                    "name": f"{job['method']} seed {job['seed']} under {spec}",
                    "run_dir": str(
                        out / tm.key / "defenses" / slug([spec]) / f"{job['method']}-s{job['seed']}"
                    ),
                }
            )
    return jobs


def calibration_job(
    tm: ThreatModel, method: str, model_jobs: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """A short run of `method` (its first planned job, cut to the threat model's smallest
    budget; a data-free attack's to a fifth of it, at least 2,000 queries), timed to
    estimate the plan."""
    job = next(j for j in model_jobs if j["method"] == method)
    queries = min(tm.budgets) if tm.pool else min(tm.top, max(2000, min(tm.budgets) // 5))
    return {
        **job,
        "budget": queries,
        "budgets": [queries],
        "eval_at": [],
        "name": f"{method} (calibration)",
        "run_dir": str(out / "calibration" / f"{tm.key}-{method}"),
        "progress": False,
    }
