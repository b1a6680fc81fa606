"""Query-efficiency benchmark: explanation attacks against DFME, under a fair protocol.

- Equal compute per query: every method gets the same clone updates per 1,000 queries
  (`clone_updates_per_1k_queries`); clone updates, generator updates and wall seconds are
  recorded at every evaluation and reported.
- Settings come from the tuning search (`megex tune`, :mod:`megex.experiments.tuning`):
  the same number of
  trials for every method, on validation images held out of the victims' training split and
  on a victim and seeds that this table never uses. The test split is read only here.
- Several victims (the recipe with different seeds) x several attack seeds; hierarchical
  bootstrap intervals; paired differences against the predictions-only baseline.
- Methods that assume something about the domain (a prior on image brightness) are reported
  in a table of their own.

For every run one attack goes to the largest budget; the smaller budgets are read off it
(exact: the schedule is constant). Runs are run folders: an interrupted benchmark resumes
where it stopped and reuses finished runs. Writes <out>/<stem>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ...runs import RunFolder
from .. import config as config_files
from .. import sweep
from ..common import fmt_budget, log
from ..methods import (
    METHODS,
    apply_settings_file,
    check_methods,
    load_tuned,
    method_settings,
    one_run_per_budget,
    require_tuned,
)
from ..runner import cells_of, get_victim, run_one
from .config import DEFAULTS, QueryEfficiencyConfig
from .report import write_outputs
from .summary import summarise

__all__ = [
    "DEFAULTS",
    "METHODS",
    "QueryEfficiencyConfig",
    "configured",
    "load_config",
    "merged_runs",
    "plan",
    "run_benchmark",
    "victim_seeds",
]


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The benchmark's settings: DEFAULTS updated by a JSON file's keys (if given)."""
    config = config_files.load(QueryEfficiencyConfig, path)
    check_methods([*config["methods"], *config["assumption_methods"], config["baseline"]])
    return config


# --- the benchmark ------------------------------------------------------------------------


def plan_dir(out: Path, args: argparse.Namespace) -> Path:
    """The folder of the benchmark's run folders."""
    return out.resolve() / ("runs-quick" if args.quick else "runs")


def finished_blocks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of the (seed, victim) pairs on which every planned method has finished."""
    blocks: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for job in jobs:
        blocks.setdefault((job["seed"], job["victim_seed"]), []).append(job)
    return [
        job
        for block in blocks.values()
        if all(RunFolder(j["run_dir"]).is_finished() for j in block)
        for job in block
    ]


def plan(config: dict[str, Any], args: argparse.Namespace, out: Path, victims: dict) -> list:
    tuned = load_tuned(config)
    budgets = sorted(set(args.budgets or (config["quick_budgets"] if args.quick else [])))
    budgets = budgets or sorted(set(config["budgets"]))
    seeds = args.seeds or (config["quick_seeds"] if args.quick else config["seeds"])
    methods = args.methods or (
        config["methods"] if args.quick else config["methods"] + config["assumption_methods"]
    )
    baseline = getattr(args, "baseline", None)
    if baseline and baseline not in methods:
        # A table against a method not run beside the others would compare nothing.
        raise ValueError(
            f"--baseline: {baseline} is not among the methods run ({', '.join(methods)}); "
            "add it to --methods"
        )
    device = args.device or config["device"]
    out, data_root = out.resolve(), args.data_root and str(Path(args.data_root).resolve())
    progress = not args.no_progress and (args.jobs or 1) == 1 and not getattr(args, "ray", None)
    chosen = {}
    for method in methods:
        require_tuned(config, method, tuned)
        chosen[method] = method_settings(config, method, tuned)
        if chosen[method][1].get("lr_schedule", "constant") != "constant":
            raise ValueError(
                f"{method}: the benchmark reads every budget off one run, which needs "
                "lr_schedule 'constant'"
            )
    runs_dir = plan_dir(out, args)
    jobs = []
    # Seed, then victim, then method: a benchmark stopped part-way has every method on the
    # same victims and seeds, a smaller but paired and balanced table.
    for seed in seeds:
        for victim_seed, victim in victims.items():
            for method, (attack, settings) in chosen.items():
                for budget, marks, tag in _runs_of(attack, settings, budgets, config):
                    jobs.append(
                        {
                            "method": method,
                            "attack": attack,
                            "settings": settings,
                            "victim_seed": victim_seed,
                            "seed": seed,
                            "budget": budget,
                            "budgets": marks,
                            "eval_at": [b for b in config["eval_at"] if b < budget]
                            if not tag
                            else [],
                            "name": f"{method} victim {victim_seed} seed {seed}{tag}",
                            # Absolute: workers (processes, Ray tasks) may start elsewhere.
                            "run_dir": str(
                                runs_dir
                                / f"{method}-v{victim_seed}-s{seed}{tag.replace(' budget ', '-b')}"
                            ),
                            "victim": str(Path(victim).resolve()),
                            "dataset": config["dataset"],
                            "pool": config["pool"],
                            "data_root": data_root,
                            "device": device,
                            "threads": args.threads,
                            "fresh": args.fresh,
                            "progress": progress,
                        }
                    )
    return jobs


def _runs_of(
    attack: str, settings: dict[str, Any], budgets: list[int], config: dict[str, Any]
) -> list[tuple[int, list[int], str]]:
    """(budget, budgets it reports, name tag) of each run of one method on one victim and
    seed: one run to the largest budget, or one per budget and mark for a method whose clone
    learns after all of a run's queries (megex.experiments.methods.one_run_per_budget)."""
    if not one_run_per_budget(attack, settings):
        return [(max(budgets), budgets, "")]
    marks = sorted({*budgets, *(b for b in config["eval_at"] if b < max(budgets))})
    return [(b, [b] if b in budgets else [], f" budget {b}") for b in marks]


def merged_runs(finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of one method, victim and seed as one (their evaluation rows together, in
    order of queries): what a method that runs once per budget reports, read as a method
    whose one run passes every budget."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for res in finished:
        groups.setdefault((res["method"], res["victim_seed"], res["seed"]), []).append(res)
    merged = []
    for runs in groups.values():
        if len(runs) == 1:
            merged.append(runs[0])
            continue
        runs = sorted(runs, key=lambda r: r["budget"])
        merged.append(
            {
                **runs[-1],
                "budgets": sorted({b for r in runs for b in r["budgets"]}),
                "metrics": sorted(
                    (row for r in runs for row in r["metrics"]), key=lambda row: row["queries"]
                ),
                "wall_s": round(sum(r["wall_s"] for r in runs), 2),
                "skipped": all(r["skipped"] for r in runs),
            }
        )
    return merged


def configured(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's config as `args` set it: the --config file, then --device, the
    --baseline and the --settings-file."""
    config = load_config(args.config)
    if args.device:
        config["device"] = args.device
    if getattr(args, "baseline", None):
        config["baseline"] = args.baseline
    apply_settings_file(config, getattr(args, "settings_file", None))
    return config


def victim_seeds(config: dict[str, Any], args: argparse.Namespace) -> list[int]:
    """The victims (recipe seeds) `args` ask for."""
    return args.victim_seeds or (
        config["quick_victim_seeds"] if args.quick else config["victim_seeds"]
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the benchmark described by `args`; write JSON, markdown and PNG."""
    config = configured(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = _jobs(config, args, out)
    planned = len(jobs)
    jobs = _selected(jobs, args, out)
    log(
        f"benchmark: {len(jobs)} runs {sweep.describe(args)}; run folders under "
        f"{plan_dir(out, args)}"
    )
    finished = _sweep(jobs, config, args, out)
    wall = time.time() - t0
    summary = summarise(finished, config, wall, args)
    stem = "query_efficiency_quick" if args.quick else "query_efficiency"
    if getattr(args, "baseline", None):
        stem += f"_vs_{args.baseline}"
    if len(jobs) < planned:
        summary["partial"] = {"runs": len(jobs), "planned": planned}
        stem += "_partial"
    paths = write_outputs(summary, out, stem, plot=not args.no_plot)
    log(f"benchmark: {wall:.0f} s wall time; wrote {', '.join(str(p) for p in paths)}")
    return summary


def _jobs(config: dict[str, Any], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Every planned run; its victims trained (or read from the cache) first."""
    seeds = victim_seeds(config, args)
    # The settings are checked before any victim is trained (minutes on a CPU).
    plan(config, args, out, {s: out / "victims" / f"seed{s}" for s in seeds})
    victims = {s: get_victim(config, out / "victims", args.data_root, s)[1] for s in seeds}
    return plan(config, args, out, victims)


def _selected(jobs: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> list:
    """The jobs this invocation runs: the finished blocks alone under --finished-only; with
    --fresh, their folders cleared first."""
    if getattr(args, "finished_only", False):
        if args.fresh:
            raise ValueError("--finished-only reads finished runs; --fresh would discard them")
        jobs = finished_blocks(jobs)
        if not jobs:
            raise ValueError(
                f"--finished-only: no (seed, victim) pair has every method finished under "
                f"{plan_dir(out, args)}; run the benchmark first"
            )
        # Finished runs are only read: no worker processes, no Ray instance.
        args.jobs, args.ray = None, None
    if args.fresh:
        # Started over here, once, so that a run retried after its worker died resumes from
        # its new checkpoint instead of starting over again.
        for job in jobs:
            shutil.rmtree(job["run_dir"], ignore_errors=True)
            job["fresh"] = False
    return jobs


def _sweep(
    jobs: list[dict[str, Any]], config: dict[str, Any], args: argparse.Namespace, out: Path
) -> list[dict[str, Any]]:
    """Run the jobs (each run reports its line as it finishes); the finished runs."""
    finished: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        finished.append(res)
        cells = cells_of(res)
        shown = ", ".join(f"{fmt_budget(b)}: {c['clone_accuracy']:.4f}" for b, c in cells.items())
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        log(
            f"[{len(finished)}/{len(jobs)}] {res['method']} victim {res['victim_seed']} "
            f"seed {res['seed']} ({how}): {shown}"
        )

    options = sweep.options(args, config["device"])
    failures = sweep.run_jobs(jobs, args.jobs, done, run_one, shared=out, **options)
    if failures:
        # A table with runs missing would compare unequal sets: none is written.
        raise sweep.SweepFailed(failures, len(jobs))
    return merged_runs(finished)
