"""Query-efficiency benchmark: MEGEX vs DFME, clone accuracy against the number of queries.

For every method and seed one run of the largest budget is made; the smaller budgets are
read off it, after the last iteration that stays within each, which is exact because the
benchmark's schedule does not depend on the budget (lr_schedule='constant' with a weight
average of the clone). A setting with a budget-dependent schedule ('multistep') gets one
run per budget instead. Runs are run folders: an interrupted benchmark resumes where it
stopped and skips what is finished.

Writes <out>/query_efficiency.json, .md (mean +- std per method and budget) and .png
(query_efficiency_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "DEFAULTS", "add_arguments", "main", "run_benchmark", "load_config"]

# Explanations by name, so configs stay plain JSON.
EXPLANATIONS: dict[str, dict[str, Any]] = {
    "gradient-all": {"method": "gradient", "target": "all"},
    "gradient-predicted": {"method": "gradient", "target": "predicted"},
    "smoothgrad-predicted": {"method": "smoothgrad", "target": "predicted"},
    "smoothgrad-all": {"method": "smoothgrad", "target": "all"},
}

# name -> (attack, settings on top of the benchmark's shared settings)
METHODS: dict[str, dict[str, Any]] = {
    "megex-all": {"attack": "megex", "explanation": "gradient-all"},
    "megex-predicted": {"attack": "megex", "explanation": "gradient-predicted"},
    "megex-smoothgrad": {"attack": "megex", "explanation": "smoothgrad-predicted"},
    "dfme-m1": {"attack": "dfme", "directions": 1},
    "dfme-m10": {"attack": "dfme", "directions": 10},
}

# The CPU-scale Fashion-MNIST setting (LeNet-5 victim and clone).
DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "victim_arch": None,  # None: the dataset's recipe (lenet5 for Fashion-MNIST)
    "victim_seed": 0,
    "budgets": [100_000, 250_000, 500_000, 1_000_000],
    "seeds": [0, 1, 2],
    "methods": list(METHODS),
    "quick_budgets": [50_000, 150_000],
    "quick_seeds": [0],
    # Shared attack settings; a small generator keeps 1M queries within CPU reach. The
    # clone's weight average (horizon ~1000 updates) removes the 2-5 point swings between
    # successive evaluations of the raw clone at a constant learning rate, so a budget's
    # figure is not one lucky or unlucky step (benchmarks/RESULTS.md).
    # Every method re-draws its generator every 100k queries: a generator late in a run
    # makes queries the victim is sure of; MEGEX and DFME (m = 1) both gained 3-12 points at
    # 500k on seeds 0 and 2 (benchmarks/RESULTS.md). The period is in queries, specific to
    # this setting's scale, like disagreement_until below. DFME with m = 10 takes a generator
    # step per 12 query batches, too few per period: it keeps one generator (with restarts
    # it lost 6 points at 1M on 3 seeds).
    "settings": {
        "ngf": 8,
        "lr_schedule": "constant",
        "clone_ema": 0.999,
        "generator_restart_every": 100_000,
    },
    # MEGEX with exact all-class gradients drops the generator's disagreement term after 150k
    # queries and keeps only the victim-guided term: the exact disagreement gradient holds the
    # clone back late in a run (benchmarks/RESULTS.md, 3 seeds). The switch point is in
    # queries, so it is specific to this setting's scale.
    "method_settings": {
        "megex-all": {"disagreement_until": 150_000},
        "dfme-m10": {"generator_restart_every": 0},
    },
    "device": "cpu",
}


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The benchmark's settings: DEFAULTS updated by a JSON file's keys (if given)."""
    config = json.loads(json.dumps(DEFAULTS))
    if path is not None:
        user = json.loads(Path(path).read_text())
        unknown = set(user) - set(config) - {"description"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(config)}")
        for key, value in user.items():
            if key in ("settings", "method_settings") and isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
    for name in config["methods"]:
        if name not in METHODS:
            raise ValueError(f"method: unknown {name!r}; expected one of {', '.join(METHODS)}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (the `megex bench` subcommand reuses them)."""
    parser.add_argument(
        "--config",
        help="JSON file of benchmark settings, e.g. benchmarks/configs/svhn.json "
        "(default: the Fashion-MNIST setting, bench.DEFAULTS)",
    )
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument("--quick", action="store_true", help="one seed, two budgets")
    parser.add_argument(
        "--budgets", type=int, nargs="+", help="query budgets to report (default: the config's)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="attack seeds, the same for all (default: the config's)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        help="methods to run (default: the config's)",
    )
    parser.add_argument(
        "--victim",
        help="victim .safetensors to use (default: the config's victim, trained once and "
        "cached under --out)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="output folder (default: benchmarks/results)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    parser.add_argument(
        "--fresh", action="store_true", help="ignore finished runs and checkpoints; start over"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(prog="megex bench", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        run_benchmark(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megex bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megex bench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


# --- the victim -------------------------------------------------------------------------


def victim_path(out: Path, config: dict[str, Any]) -> Path:
    from .victim import RECIPES

    recipe = RECIPES.get(config["dataset"])
    arch = config["victim_arch"] or (recipe.arch if recipe else "lenet5")
    return out / "victims" / f"{config['dataset']}-{arch}-seed{config['victim_seed']}.safetensors"


def get_victim(config: dict[str, Any], out: Path, data_root: str | None, given: str | None):
    """The cached victim, or a freshly trained one (then cached for the next run)."""
    from .victim import RECIPES, Victim, train_victim

    path = Path(given) if given else victim_path(out, config)
    if path.is_file():
        victim = Victim.load(path)
        _log(f"victim: {path} ({victim.arch}, test accuracy {victim.accuracy:.4f})")
        return victim, path
    if given:
        raise FileNotFoundError(f"victim: no file at {path}")
    _log(f"victim: training on {config['dataset']} (cached afterwards at {path})")
    victim = train_victim(
        config["dataset"],
        config["victim_arch"],
        seed=config["victim_seed"],
        data_root=data_root,
        device=config["device"],
    )
    victim.save(path)
    _log(f"victim: test accuracy {victim.accuracy:.4f}, {victim.metadata.get('train_seconds')} s")
    recipe = RECIPES.get(config["dataset"])
    if recipe is not None and victim.accuracy < recipe.expected_accuracy:
        _log(
            f"victim: warning: below the recipe's documented {recipe.expected_accuracy:.2f}; "
            "clone ratios are relative to this victim"
        )
    return victim, path


# --- one run ----------------------------------------------------------------------------


def method_settings(config: dict[str, Any], method: str) -> tuple[str, dict[str, Any]]:
    """(attack name, settings) for a method: shared settings, then the method's own."""
    spec = dict(METHODS[method])
    attack = spec.pop("attack")
    settings = {**config["settings"], **spec, **config["method_settings"].get(method, {})}
    return attack, settings


def _build(attack: str, settings: dict[str, Any], seed: int, device: str):
    from .attacks import ATTACKS
    from .explain import Explanation

    settings = dict(settings)
    if "explanation" in settings:
        name = settings["explanation"]
        spec = EXPLANATIONS[name] if isinstance(name, str) else name
        settings["explanation"] = Explanation.from_dict(spec)
    if "lr_milestones" in settings:
        settings["lr_milestones"] = tuple(settings["lr_milestones"])
    return ATTACKS[attack](seed=seed, device=device, **settings)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) run up to the largest budget; evaluations at every budget."""
    import torch

    from . import data as data_mod
    from .attacks.base import changed_settings
    from .evaluate import Evaluator
    from .oracle import LocalOracle
    from .runs import RunFolder
    from .victim import Victim

    torch.set_num_threads(job["threads"])
    if str(job["device"]).startswith("cuda"):
        # Full fp32 as on a CPU: with TF32 (PyTorch's default for cuDNN convolutions)
        # DFME's forward differences (eps 1e-3) drown in rounding, and the maps lose bits.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    folder = RunFolder(job["run_dir"])
    victim = Victim.load(job["victim"])
    attack = _build(job["attack"], job["settings"], job["seed"], job["device"])
    oracle = LocalOracle(
        victim, budget=job["budget"], explanation=None, seed=job["seed"], device=job["device"]
    )
    if folder.config_path.is_file() and not job["fresh"]:
        # A finished or interrupted run is reused only if it had these very settings.
        changed = changed_settings(folder, attack.describe(job["budget"], oracle))
        if changed:
            raise ValueError(
                f"{folder.path} holds a run with other settings ({'; '.join(changed)}); "
                "pass --fresh to run it again, or choose another --out"
            )
    if folder.is_finished() and not job["fresh"]:
        result = json.loads(folder.result_path.read_text())
        return {**job, "metrics": result["metrics"], "wall_s": result["elapsed_s"], "skipped": True}
    ds = data_mod.load(job["dataset"], job["data_root"])
    x_test, y_test = ds.test_tensors()
    evaluator = Evaluator.from_victim(victim, x_test, y_test)
    explanation = getattr(attack.config, "explanation", None)
    if job["attack"] == "megex":
        oracle.explanation = explanation
    resume = folder.has_checkpoint() and not job["fresh"]
    if resume:
        # The service's ledger and noise continue where the interrupted run left them.
        oracle.load_state_dict(folder.load_checkpoint()["service"])
    start = time.time()
    result = attack.run(
        oracle,
        job["budget"],
        evaluator=evaluator,
        eval_every=max(job["budget"] // 20, 1),
        eval_at=job["budgets"],
        run_dir=job["run_dir"],
        resume=resume,
        progress=job["progress"],
        service_state=oracle.state_dict,
    )
    if not result.finished:
        raise KeyboardInterrupt
    return {
        **job,
        "metrics": result.metrics,
        "wall_s": round(time.time() - start, 1),
        "run_elapsed_s": result.elapsed_s,
        "queries_used": oracle.queries_used,
        "victim_accuracy": victim.accuracy,
        "skipped": False,
    }


# --- the benchmark ----------------------------------------------------------------------


def plan(config: dict[str, Any], args: argparse.Namespace, out: Path, victim: Path) -> list:
    budgets = sorted(set(args.budgets or (config["quick_budgets"] if args.quick else [])))
    budgets = budgets or sorted(set(config["budgets"]))
    seeds = args.seeds or (config["quick_seeds"] if args.quick else config["seeds"])
    methods = args.methods or config["methods"]
    device = args.device or config["device"]
    jobs = []
    for method in methods:
        attack, settings = method_settings(config, method)
        # A budget-independent schedule lets one run report every budget on its way.
        groups = [budgets] if settings.get("lr_schedule") == "constant" else [[b] for b in budgets]
        for seed in seeds:
            for group in groups:
                tag = f"{method}-seed{seed}-{max(group)}"
                jobs.append(
                    {
                        "method": method,
                        "attack": attack,
                        "settings": settings,
                        "seed": seed,
                        "budget": max(group),
                        "budgets": group,
                        "run_dir": str(out / "runs" / tag),
                        "victim": str(victim),
                        "dataset": config["dataset"],
                        "data_root": args.data_root,
                        "device": device,
                        "threads": args.threads,
                        "fresh": args.fresh,
                        "progress": not args.no_progress and args.jobs == 1,
                    }
                )
    return jobs


def cells_of(done: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The evaluation row for each budget of a run: the last one within that budget."""
    cells = {}
    for budget in done["budgets"]:
        rows = [r for r in done["metrics"] if r["queries"] <= budget]
        if rows:
            cells[budget] = rows[-1]
    return cells


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the benchmark described by `args`; write JSON, markdown and PNG."""
    config = load_config(args.config)
    if args.device:
        config["device"] = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    victim, vpath = get_victim(config, out, args.data_root, args.victim)
    jobs = plan(config, args, out, vpath)
    _log(f"benchmark: {len(jobs)} runs, {args.jobs} at a time; run folders under {out / 'runs'}")
    finished: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        finished.append(res)
        cells = cells_of(res)
        shown = ", ".join(f"{b // 1000}k: {c['clone_accuracy']:.4f}" for b, c in cells.items())
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        _log(f"[{len(finished)}/{len(jobs)}] {res['method']} seed {res['seed']} ({how}): {shown}")

    if args.jobs <= 1:
        for job in jobs:
            done(run_one(job))
    else:
        import multiprocessing

        # One process per run (spawned: no forked torch state); on Ctrl-C the workers are
        # ended at once. Checkpoints are written atomically, so each run resumes from its
        # last evaluation next time.
        pool = multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1)
        try:
            for res in pool.imap_unordered(run_one, jobs, chunksize=1):
                done(res)
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.close()
            pool.join()
    wall = time.time() - t0
    summary = summarise(finished, victim.accuracy, config, wall, args)
    stem = "query_efficiency_quick" if args.quick else "query_efficiency"
    paths = write_outputs(summary, out, stem, plot=not args.no_plot)
    _log(f"benchmark: {wall:.0f} s wall time; wrote {', '.join(str(p) for p in paths)}")
    return summary


def summarise(finished: list, victim_accuracy: float, config: dict, wall: float, args) -> dict:
    """Per-run cells and per-(method, budget) mean and std of clone accuracy."""
    runs, table = [], {}
    for res in sorted(finished, key=lambda r: (r["method"], r["seed"], r["budget"])):
        for budget, row in cells_of(res).items():
            cell = {
                "method": res["method"],
                "seed": res["seed"],
                "budget": budget,
                "queries": row["queries"],
                "clone_accuracy": row["clone_accuracy"],
                "fidelity": row.get("fidelity"),
                "ratio": row["clone_accuracy"] / victim_accuracy,
            }
            runs.append(cell)
            table.setdefault(res["method"], {}).setdefault(budget, []).append(cell)
    stats = {}
    for method, by_budget in table.items():
        stats[method] = {}
        for budget, cells in sorted(by_budget.items()):
            accs = [c["clone_accuracy"] for c in cells]
            stats[method][budget] = {
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "ratio": statistics.fmean(accs) / victim_accuracy,
                "seeds": len(accs),
            }
    curves = {
        f"{r['method']}-seed{r['seed']}": [
            [m["queries"], m["clone_accuracy"]] for m in r["metrics"]
        ]
        for r in finished
    }
    return {
        "dataset": config["dataset"],
        "victim_accuracy": victim_accuracy,
        "settings": config["settings"],
        "method_settings": {m: method_settings(config, m)[1] for m in table},
        "wall_s": round(wall, 1),
        "run_wall_s": {
            f"{r['method']}-seed{r['seed']}-{r['budget']}": r["wall_s"] for r in finished
        },
        "threads_per_run": args.threads,
        "jobs": args.jobs,
        "cells": runs,
        "stats": stats,
        "curves": curves,
        "queries_to_reach": queries_to_reach_dfme(finished, stats),
    }


def queries_to_reach_dfme(finished: list, stats: dict) -> dict[str, Any]:
    """Queries each MEGEX run needs to reach the best DFME mean at DFME's largest budget."""
    dfme = [(m, s) for m, s in stats.items() if m.startswith("dfme")]
    if not dfme:
        return {}
    best = max((s[max(s)]["mean"], m, max(s)) for m, s in dfme)
    target, name, budget = best
    out: dict[str, Any] = {"target": {"method": name, "budget": budget, "accuracy": target}}
    # In seed order (runs finish in any order), each hit labelled with its seed.
    for res in sorted(finished, key=lambda r: (r["method"], r["seed"], r["budget"])):
        if res["method"].startswith("megex"):
            rows = res["metrics"]
            hit = next((m["queries"] for m in rows if m["clone_accuracy"] >= target), None)
            out.setdefault(res["method"], []).append({"seed": res["seed"], "queries": hit})
    return out


def markdown(summary: dict[str, Any]) -> str:
    stats = summary["stats"]
    budgets = sorted({b for s in stats.values() for b in s})
    head = "| method | " + " | ".join(_fmt_budget(b) for b in budgets) + " |"
    lines = [head, "|" + " --- |" * (len(budgets) + 1)]
    for method, by_budget in stats.items():
        cells = []
        for b in budgets:
            s = by_budget.get(b)
            cells.append(
                "-"
                if s is None
                else f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} ({s['ratio']:.2f}x)"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = max((s["seeds"] for m in stats.values() for s in m.values()), default=0)
    lines.append("")
    lines.append(
        f"Clone test accuracy % (mean +- std over {seeds} seed(s)), (x victim accuracy "
        f"{100 * summary['victim_accuracy']:.1f}%). Wall time of this invocation "
        f"{summary['wall_s']:.0f} s (finished runs are reused; their own times are in the "
        f"JSON's run_wall_s), "
        f"{summary['jobs']} run(s) at a time, {summary['threads_per_run']} thread(s) each."
    )
    reach = summary.get("queries_to_reach") or {}
    if reach:
        t = reach["target"]
        lines.append("")
        lines.append(
            f"Queries to reach {t['method']}'s {_fmt_budget(t['budget'])} accuracy "
            f"({100 * t['accuracy']:.1f}%):"
        )
        for method, hits in reach.items():
            if method != "target":
                shown = ", ".join(
                    f"{'not reached' if h['queries'] is None else format(h['queries'], ',')} "
                    f"(seed {h['seed']})"
                    for h in hits
                )
                lines.append(f"- {method}: {shown}")
    return "\n".join(lines) + "\n"


def write_outputs(
    summary: dict[str, Any], out: Path, stem: str = "query_efficiency", plot: bool = True
) -> list[Path]:
    from .runs import write_json_atomic

    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json_atomic(paths[0], summary)
    paths[1].write_text(markdown(summary))
    if plot:
        try:
            paths.append(plot_curves(summary, out / f"{stem}.png"))
        except ImportError:
            _log("plot: matplotlib is not installed (pip install 'megex[plots]'); PNG skipped")
    return paths


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_budget in summary["stats"].items():
        budgets = sorted(by_budget)
        means = [100 * by_budget[b]["mean"] for b in budgets]
        stds = [100 * by_budget[b]["std"] for b in budgets]
        ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.axhline(100 * summary["victim_accuracy"], color="grey", ls="--", lw=1, label="victim")
    ax.set_xscale("log")
    ax.set_xlabel("queries")
    ax.set_ylabel("clone test accuracy (%)")
    ax.set_title(f"Query efficiency on {summary['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt_budget(b: int) -> str:
    if b >= 1_000_000 and b % 100_000 == 0:
        return f"{b / 1_000_000:g}M"
    return f"{b / 1000:g}k" if b >= 1000 else str(b)


def _log(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
