"""megex audit: one command that measures what a model gives away and what helps.

On one victim (a file, or a service URL) it runs a compact version of the fair protocol:
for each threat model (data-free; with `pool`, the attacker who holds images), the
predictions-only attacker against the map attacker at a few budgets, every method on the
same attack seeds, with the package's searched settings (megex.experiments.audit.threats);
then each defence asked for at the largest budget, with its cost to honest users on the
victim's test images. A short calibration run times each method first; the plan is
estimated, printed and cut to `time_limit_s` (megex.experiments.audit.plan). Every run is
the benchmark's run folder under `out`, so an interrupted audit resumes where it stopped and
its figures are the benchmark's (its summary code computes them). Writes report.json,
report.md and report.html (plots embedded) into `out`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import __version__
from ...defenses import build_defense
from ...runs import write_json_atomic
from .. import sweep
from ..common import fmt_budget, log
from ..query_efficiency import merged_runs
from ..query_efficiency.summary import summarise
from ..runner import run_one
from .calibrate import calibrate
from .defences import served_utility
from .jobs import bench_args, defence_jobs, threat_model_jobs
from .monitors import MONITOR_QUERIES, watch
from .plan import RUN_OVERHEAD_S, AuditPlan, PlanTooLong, estimate_seconds, fit_to_time_limit
from .report import write_report
from .search import check_searchable, search_settings, searched_source
from .summary import defence_row, threat_model_summary
from .threats import settings_source, threat_models, with_tuned
from .victims import AuditTarget, describe_pool, resolve_target

__all__ = ["DEFAULT_DEFENSES", "AuditOptions", "PlanTooLong", "run_audit"]

# The defences that mattered in the benchmark's measurements (docs/results/tradeoff.md and
# attackers-with-images.md): the two on the predictions that removed the data-free maps'
# lead, and 2-bit maps, the one on the maps that cut the lead of the attacker with images.
DEFAULT_DEFENSES = ("label-only", "reverse-sigmoid", "quantize:bits=2")
STATE = "audit.json"
MIN_BUDGET = 10_000
MIN_POOL_BUDGET = 500


@dataclass
class AuditOptions:
    victim: str
    out: Path
    api_key: str | None = None
    # How a victim URL is spoken to (megex.client.connect): "auto", "v2" or "v1"; V2's
    # tensor encoding.
    protocol: str = "auto"
    encoding: str = "auto"
    dataset: str | None = None
    data_root: str | None = None
    pool: str | None = None
    explanation: str = "gradient"
    budget: int | None = None
    pool_budget: int = 1000
    seeds: int = 3
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    time_limit_s: float | None = None
    jobs: int = 1
    fresh: bool = False
    progress: bool = True
    monitors: bool = True
    # Trials per method of a search on the victim (0: the shipped settings).
    search_trials: int = 0
    command: str = ""
    # Filled in by run_audit: what the state file compares on a resumed audit.
    asked: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The options that decide what is run (a resumed audit must match them)."""
        keys = ("victim", "dataset", "pool", "explanation", "budget", "pool_budget", "seeds",
                "search_trials")  # fmt: skip
        # Not the time limit: a rerun with another one reuses the runs both plans share.
        return {**{k: getattr(self, k) for k in keys}, "defenses": list(self.defenses)}


def run_audit(options: AuditOptions) -> dict[str, Any]:
    """Run (or resume) the audit `options` describe; write and return its summary."""
    t0 = time.time()
    out = Path(options.out).resolve()
    _check_options(options)
    _prepare_out(out, options)
    target = resolve_target(
        options.victim,
        out,
        options.dataset,
        options.api_key,
        options.data_root,
        protocol=options.protocol,
        encoding=options.encoding,
    )
    if options.search_trials:
        check_searchable(target, options.explanation)
    # Written once the victim is known good: a mistake leaves no audit behind.
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATE, {"options": options.identity(), "megex_version": __version__})
    log(f"audit: {target.source} ({target.dataset}, victim accuracy {target.accuracy:.4f})")
    models, skipped = threat_models(
        target, options.explanation, options.budget, options.pool, options.pool_budget
    )
    if options.search_trials:
        models = [_searched(tm, target, options, out) for tm in models]
    defenses, more_skipped = _defences(options, target, models)
    skipped += more_skipped
    plan = AuditPlan(
        tuple(models),
        tuple(range(options.seeds)),
        tuple(defenses),
        frozenset(s for s in defenses if build_defense(s).side == "prediction"),
    )
    planned = {tm.key: _jobs_of(tm, target, plan, options, out) for tm in models}
    rates, calibration = calibrate(plan, planned, out) if models else ({}, {})
    watching = options.monitors and target.kind == "file" and bool(models)
    extra = _monitor_seconds(plan, rates) if watching else 0.0
    limit = None if options.time_limit_s is None else options.time_limit_s - extra
    plan, cuts = fit_to_time_limit(plan, rates, limit, options.jobs)
    estimated = (estimate_seconds(plan, rates, options.jobs) if models else 0.0) + extra
    log(f"audit plan (about {estimated / 60:.1f} min on {options.jobs} worker(s)):")
    for line in [*plan.describe().splitlines(), *cuts]:
        log(f"  {line}")
    finished = _run(plan, target, options, out)
    summary = _summary(plan, target, options, finished, skipped, out)
    if watching:
        summary["monitors"] = _kept_monitors(plan, target, options, out)
    elif options.monitors and target.kind == "url" and models:
        summary["skipped"].append(
            {
                "part": "monitors",
                "why": "the monitors read the victim's honest probabilities, which a URL does "
                "not give; audit the model file, or serve it with megex serve --monitor",
            }
        )
    summary["plan"].update(
        time_limit_s=options.time_limit_s,
        estimated_s=round(estimated, 1),
        calibration=calibration,
        reductions=cuts,
    )
    summary["wall_s"] = round(time.time() - t0, 1)
    paths = write_report(summary, out)
    log(f"audit: {summary['wall_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return summary


def _searched(tm: Any, target: AuditTarget, options: AuditOptions, out: Path) -> Any:
    """The threat model with settings searched on the audited victim (resumed if begun)."""
    log(f"audit: searching {tm.key}: {options.search_trials} trials per method")
    tuned = search_settings(tm, target, options.search_trials, out, options.data_root, options.jobs)
    return with_tuned(tm, str(tuned))


def _monitor_seconds(plan: AuditPlan, rates: dict[str, dict[str, float]]) -> float:
    """The monitors' attack streams: one run of each method to MONITOR_QUERIES at most."""
    return sum(
        RUN_OVERHEAD_S + rates[tm.key][m] * min(MONITOR_QUERIES, tm.top)
        for tm in plan.threat_models
        for m in tm.methods
    )


def _kept_monitors(
    plan: AuditPlan, target: AuditTarget, options: AuditOptions, out: Path
) -> dict[str, Any]:
    """The monitors' block, kept in <out>/monitors.json for a resumed audit of the same plan."""
    path = out / "monitors.json"
    key = {tm.key: [list(tm.methods), tm.top] for tm in plan.threat_models}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("plan") == key:
            return kept["monitors"]
    block = watch(plan, target.location, options.data_root)
    write_json_atomic(path, {"plan": key, "monitors": block})
    return block


def _check_options(options: AuditOptions) -> None:
    if options.search_trials < 0:
        raise ValueError(f"--search: {options.search_trials} trials; expected 1 or more")
    if options.seeds < 2:
        raise ValueError(f"--seeds: {options.seeds}; an interval needs at least 2")
    if options.budget is not None and options.budget < MIN_BUDGET:
        raise ValueError(
            f"--budget: at least {MIN_BUDGET} queries (its smallest budget, a tenth of it, must "
            f"hold a few iterations of each data-free attack); got {options.budget}"
        )
    if options.pool_budget < MIN_POOL_BUDGET:
        raise ValueError(
            f"--pool-budget: at least {MIN_POOL_BUDGET} queries (its smallest budget, a tenth "
            f"of it, must hold a batch of queries); got {options.pool_budget}"
        )
    if options.jobs < 1:
        raise ValueError(f"--jobs: {options.jobs}; expected 1 or more")
    if options.time_limit_s is not None and not options.time_limit_s > 0:
        raise ValueError(f"--time-limit: expected a positive duration, got {options.time_limit_s}")
    for spec in options.defenses:
        try:
            build_defense(spec)
        except ValueError as err:
            raise ValueError(f"--defense: {err}") from None


def _prepare_out(out: Path, options: AuditOptions) -> None:
    """Check `out` against the audit kept there: a rerun with the same options resumes;
    other options are refused (or, with fresh, the earlier audit's files are removed)."""
    state = out / STATE
    if options.fresh and state.is_file():
        names = ("calibration", "data-free", "with-images", "plots", "search")
        for name in (*names, "served-answers.pt", "calibration.json", "monitors.json"):
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
    elif state.is_file():
        earlier = json.loads(state.read_text()).get("options", {})
        changed = sorted(k for k, v in options.identity().items() if earlier.get(k) != v)
        if changed:
            raise ValueError(
                f"--out: {out} holds an audit with other options ({', '.join(changed)}); "
                "choose another --out, or pass --fresh to start it over"
            )
        log(f"audit: resuming the audit in {out}")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out: {out} is not empty and holds no audit; choose another folder")


def _defences(
    options: AuditOptions, target: AuditTarget, models: list
) -> tuple[list[str], list[dict[str, str]]]:
    if not options.defenses or not models:
        return [], []
    if target.kind == "url":
        why = (
            "the victim is a URL: its defences are the server's to apply; audit the model "
            "file (or serve it with megex serve --defense) to compare defences"
        )
        return [], [{"part": "defences", "why": why}]
    return list(options.defenses), []


def _jobs_of(
    tm: Any, target: AuditTarget, plan: AuditPlan, options: AuditOptions, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seeds = list(plan.seeds)
    return threat_model_jobs(
        tm, target, seeds, out, options.data_root, options.jobs, options.progress
    )


def _run(
    plan: AuditPlan, target: AuditTarget, options: AuditOptions, out: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every run of the plan (finished ones are read back), by threat model; defended runs
    under '<key>/defended'."""
    jobs: list[dict[str, Any]] = []
    for tm in plan.threat_models:
        _, undefended = threat_model_jobs(
            tm, target, list(plan.seeds), out, options.data_root, options.jobs, options.progress
        )
        jobs += [{**j, "group": tm.key} for j in undefended]
        jobs += [
            {**j, "group": f"{tm.key}/defended"} for j in defence_jobs(plan, tm, undefended, out)
        ]
    finished: dict[str, list[dict[str, Any]]] = {}

    def done(res: dict[str, Any]) -> None:
        finished.setdefault(res["group"], []).append(res)
        count = sum(len(v) for v in finished.values())
        last = res["metrics"][-1]["clone_accuracy"] if res["metrics"] else float("nan")
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        queries = fmt_budget(res["budget"])
        log(f"[{count}/{len(jobs)}] {res['name']} to {queries} ({how}): {last:.4f}")

    failures = sweep.run_jobs(jobs, options.jobs, done, run_one, shared=out)
    if failures:
        raise sweep.SweepFailed(failures, len(jobs))
    return finished


def _summary(
    plan: AuditPlan,
    target: AuditTarget,
    options: AuditOptions,
    finished: dict[str, list[dict[str, Any]]],
    skipped: list[dict[str, str]],
    out: Path,
) -> dict[str, Any]:
    sections, blocks = [], []
    for tm in plan.threat_models:
        runs = merged_runs(finished.get(tm.key, []))
        config, _ = _jobs_of(tm, target, plan, options, out)
        args = bench_args(tm, list(plan.seeds), None, options.jobs, False)
        bench = summarise(runs, config, 0.0, args)
        section = threat_model_summary(tm, bench, runs, target.accuracy)
        section["pool"] = describe_pool(tm.pool, target, options.data_root) if tm.pool else None
        section["settings_source"] = (
            searched_source(Path(tm.tuned), target) if tm.tuned else settings_source(tm.key)
        )
        sections.append(section)
        if plan.defenses:
            utility = served_utility(target, plan.defenses, options.data_root)
            defended = finished.get(f"{tm.key}/defended", [])
            rows = []
            for spec in plan.defenses:
                kind = "prediction" if spec in plan.prediction_defenses else "explanation"
                mine = [r for r in defended if r.get("defense") == spec]
                rows.append(defence_row(spec, kind, utility[spec], tm, runs, mine))
            blocks.append(
                {"threat_model": tm.key, "title": tm.title, "budget": tm.top, "rows": rows}
            )
    return {
        "title": "megex audit",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "megex_version": __version__,
        "out": str(out),
        "victim": target.describe(),
        "explanations": _explanations(target, options),
        "plan": {
            "seeds": list(plan.seeds),
            "commands": [options.command] if options.command else [],
        },
        "threat_models": sections,
        "defenses": blocks or None,
        "monitors": None,
        "skipped": skipped,
        "caveats": _caveats(plan, target),
    }


def _explanations(target: AuditTarget, options: AuditOptions) -> dict[str, Any]:
    if not target.explanations:
        return {"returned": False, "method": None, "targets": [], "note": "no explanations"}
    note = (
        f"the model file answers any explanation; the audit asked for {options.explanation} maps"
        if target.kind == "file"
        else f"the service lists an explanation output; the audit asked for {options.explanation}"
    )
    return {"returned": True, "method": options.explanation, "targets": ["all", "predicted"],
            "note": note}  # fmt: skip


def _caveats(plan: AuditPlan, target: AuditTarget) -> list[str]:
    seeds = len(plan.seeds)
    caveats = [
        f"One victim and {seeds} attack seeds: the intervals are over the seeds (the "
        "attack's randomness); the benchmark's victim-to-victim spread is not in them.",
        (
            "Settings were searched on this victim's held-out images with a short search "
            "(a longer one may find better settings, for either attacker)."
            if any(tm.tuned for tm in plan.threat_models)
            else "Settings were searched on Fashion-MNIST LeNet-5 victims, not on this one: "
            "an attacker who tunes on this victim may do better (megex audit --search)."
        ),
        "The attackers do not adapt to a defence; an adaptive attacker may take back part "
        "of what a defence took.",
    ]
    for tm in plan.threat_models:
        caveats.append(
            f"{tm.key}: the largest budget is {fmt_budget(tm.top)} queries; an attacker with "
            "more queries gets closer to the victim."
        )
    return caveats
