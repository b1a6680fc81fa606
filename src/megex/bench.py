"""Query-efficiency benchmark: explanation attacks against DFME, under a fair protocol.

- Equal compute per query: every method gets the same clone updates per 1,000 queries
  (`clone_updates_per_1k_queries`); clone updates, generator updates and wall seconds are
  recorded at every evaluation and reported.
- Settings come from the tuning search (`megex.tune`, benchmarks/tune.py): the same number of
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
import json
import os
import shutil
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
    "integrated_gradients-all": {"method": "integrated_gradients", "target": "all", "steps": 16},
    "input_x_gradient-all": {"method": "input_x_gradient", "target": "all"},
}

PRIOR = [0.5, 4.5]
# name -> attack, its fixed settings, and (for variants) the method whose tuned settings it takes.
METHODS: dict[str, dict[str, Any]] = {
    "megex-all": {"attack": "megex", "explanation": "gradient-all"},
    "megex-predicted": {"attack": "megex", "explanation": "gradient-predicted"},
    "megex-smoothgrad": {"attack": "megex", "explanation": "smoothgrad-predicted"},
    "dfme": {"attack": "dfme"},
    # DFME with 10 directions per image (11 queries per generator image), as MAZE uses.
    "dfme-m10": {"attack": "dfme", "directions": 10, "tuned_as": "dfme"},
    # The strongest use of the maps: every answered map, fresh or replayed, also trains the
    # clone's input gradients (Jacobian matching); clone queries ask for maps too.
    "megex-jacobian": {
        "attack": "megex",
        "explanation": "gradient-all",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
    "megex-jacobian-predicted": {
        "attack": "megex",
        "explanation": "gradient-predicted",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
    # The same attacker given the other kinds of maps services return (each undone to a
    # gradient where it can be), with the settings searched for megex-jacobian.
    **{
        f"megex-jacobian-{name.split('-')[0]}": {
            "attack": "megex",
            "explanation": name,
            "explain_clone_queries": True,
            "replay_maps": True,
            "tuned_as": "megex-jacobian",
        }
        for name in ("smoothgrad-all", "integrated_gradients-all", "input_x_gradient-all")
    },
    # With a brightness prior: an assumption about the domain (dark or light backgrounds).
    "megex-all+prior": {
        "attack": "megex",
        "explanation": "gradient-all",
        "query_gamma": PRIOR,
        "tuned_as": "megex-all",
    },
    "dfme+prior": {"attack": "dfme", "query_gamma": PRIOR, "tuned_as": "dfme"},
}
# Attackers that try to stay under an out-of-distribution query monitor (megex.detection):
# their generator also raises the victim's confidence, they send the images their clone is
# most confident on, and 6 confident padding images after each (6/7 of the budget: on the
# Fashion-MNIST victim, what keeps the first window under the calibrated threshold);
# otherwise the settings searched for the method they evade with.
METHODS.update(
    {
        f"{method}+evasive": {
            **METHODS[method],
            "attack": f"{METHODS[method]['attack']}-evasive",
            "victim_confidence": 1.0,
            "padding_per_query": 6,
            "tuned_as": method,
        }
        for method in ("megex-all", "megex-jacobian", "dfme")
    }
)
ASSUMPTIONS = {
    "+prior": f"queries raised to a power in {PRIOR} (query_gamma): assumes the domain's "
    "images have dark or light backgrounds"
}

# The CPU-scale Fashion-MNIST setting (LeNet-5 victims and clone).
DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "victim_arch": None,  # None: the dataset's recipe (lenet5 for Fashion-MNIST)
    "victim_seeds": [0, 1, 2],
    "seeds": [0, 1, 2],
    # The last 5,000 training images: held out of every victim's training, and what the
    # tuning search measures on. The test split is read by this table alone.
    "validation_images": 5000,
    # Up to 250k: 8 methods x 9 runs fit about a working day on 2 cores (500k would double it).
    "budgets": [50_000, 100_000, 250_000],
    # Evaluations besides the budgets, for the queries needed to reach a target.
    # (From 1k: the leakage curve, benchmarks/configs/leakage.json, can read these runs too.)
    "eval_at": [
        1_000,
        2_000,
        3_000,
        5_000,
        7_500,
        10_000,
        15_000,
        20_000,
        30_000,
        75_000,
        150_000,
        200_000,
    ],
    "methods": [
        "megex-all",
        "megex-predicted",
        "megex-smoothgrad",
        "megex-jacobian",
        "megex-jacobian-predicted",
        "dfme",
    ],
    "assumption_methods": ["megex-all+prior", "dfme+prior"],
    "baseline": "dfme",
    "targets": [0.8, 0.9],
    # 6 methods x 1 run to 75k: 6 minutes on 2 idle cores with the searched settings.
    "quick_budgets": [25_000, 75_000],
    "quick_seeds": [0],
    "quick_victim_seeds": [0],
    # Shared by every method and not searched: a small generator keeps the CPU runs short,
    # the constant schedule lets one run report every budget, the weight average removes
    # the swings of a constant learning rate, and the compute per query is the same for all.
    "settings": {
        "ngf": 8,
        "lr_schedule": "constant",
        "clone_ema": 0.999,
        "clone_updates_per_1k_queries": 25.0,
    },
    # The search's output (megex.tune); null: the package defaults, untuned.
    "tuned_settings": "benchmarks/results/tuning/tuned.json",
    # A search of this config's own ({"methods": [...], "trials": N, "budget": B}), which
    # the input-size sweep (megex.dimension) runs before the benchmark; null: none.
    "search": None,
    "method_settings": {},
    "device": "cpu",
}


def merged_config(
    defaults: dict[str, Any],
    path: str | os.PathLike | None,
    merged: tuple[str, ...] = ("settings", "method_settings"),
) -> dict[str, Any]:
    """A copy of `defaults` updated by a JSON file's keys (if given); the keys in `merged`
    hold dicts that the file's dicts update rather than replace. Unknown keys are refused."""
    config = json.loads(json.dumps(defaults))
    if path is not None:
        user = json.loads(Path(path).read_text())
        unknown = set(user) - set(config) - {"description"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(config)}")
        for key, value in user.items():
            if key in merged and isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
    return config


def check_methods(names: list[str]) -> None:
    """Refuse a method name that METHODS does not have."""
    for name in names:
        if name not in METHODS:
            raise ValueError(f"method: unknown {name!r}; expected one of {', '.join(METHODS)}")


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The benchmark's settings: DEFAULTS updated by a JSON file's keys (if given)."""
    config = merged_config(DEFAULTS, path)
    check_methods([*config["methods"], *config["assumption_methods"], config["baseline"]])
    return config


def load_tuned(config: dict[str, Any]) -> dict[str, Any]:
    """{"methods": {name: settings}, ...} from the search's output file, or {} when none."""
    path = config.get("tuned_settings")
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tuned_settings: no file at {path}; run benchmarks/tune.py to make it, or set "
            '"tuned_settings": null in the config for the untuned package defaults'
        )
    return json.loads(path.read_text())


def apply_settings_file(config: dict[str, Any], settings_file: str | None) -> None:
    """--settings-file: the tuned settings file to read instead of the config's; 'none' for
    the package defaults, untuned; None leaves the config's."""
    if settings_file:
        none = settings_file.strip().lower() == "none"
        config["tuned_settings"] = None if none else settings_file


def method_settings(
    config: dict[str, Any], method: str, tuned: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(attack name, settings): shared, then the method's fixed, tuned and configured ones."""
    spec = dict(METHODS[method])
    attack = spec.pop("attack")
    tuned_as = spec.pop("tuned_as", method)
    searched = ((tuned or {}).get("methods") or {}).get(tuned_as, {})
    settings = {
        **config["settings"],
        **searched,
        **spec,
        **config["method_settings"].get(method, {}),
    }
    return attack, settings


def require_tuned(config: dict[str, Any], method: str, tuned: dict[str, Any] | None) -> None:
    """With a search's output `tuned`, refuse a method whose settings it does not hold (the
    search has not finished it) rather than run it untuned."""
    source = METHODS[method].get("tuned_as", method)
    if tuned and source not in (tuned.get("methods") or {}):
        raise ValueError(
            f"tuned_settings: {config['tuned_settings']} has no settings for {source!r} "
            f"(the search has not finished it); run megex tune --methods {source}, or run "
            "untuned, without a settings file"
        )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (the `megex bench` subcommand reuses them)."""
    parser.add_argument("--config", help="JSON file of benchmark settings (e.g. configs/svhn.json)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick", action="store_true", help="one victim, one seed, two budgets, no prior table"
    )
    parser.add_argument("--budgets", type=int, nargs="+", help="query budgets to report")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds (same for all)")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="methods to run")
    parser.add_argument(
        "--out", default="benchmarks/results", help="output folder (default: benchmarks/results)"
    )
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json; default: the config's "
        "tuned_settings); 'none': the package defaults, untuned",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    parser.add_argument(
        "--fresh", action="store_true", help="ignore finished runs and checkpoints; start over"
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: a table (<stem>_partial.*) of the finished runs, restricted to the "
        "(seed, victim) pairs on which every method has finished, so that it stays paired",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from . import sweep

    sweep.add_arguments(parser, "runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`megex bench` (benchmarks/query_efficiency.py calls this): the exit statuses of
    megex.cli (2 a mistake in the settings, 1 a failure, 130 interrupted)."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


# --- victims ------------------------------------------------------------------------------


def get_victim(config: dict[str, Any], folder: Path, data_root: str | None, seed: int):
    """(victim, path): the victim of recipe seed `seed`, from `folder` or freshly trained."""
    from .victim import cached_victim

    return cached_victim(
        folder,
        config["dataset"],
        config["victim_arch"],
        seed=seed,
        validation_images=config["validation_images"],
        data_root=data_root,
        device=config["device"],
        log=_log,
    )


# --- one run ------------------------------------------------------------------------------


def build_attack(attack: str, settings: dict[str, Any], seed: int, device: str):
    from .attacks import ATTACKS
    from .explain import Explanation

    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    if "explanation" in settings:
        name = settings["explanation"]
        spec = EXPLANATIONS[name] if isinstance(name, str) else name
        settings["explanation"] = Explanation.from_dict(spec)
    return ATTACKS[attack](seed=seed, device=device, **settings)


def prepare_torch(threads: int, device: str) -> None:
    import torch

    from .accel import exact_fp32

    torch.set_num_threads(threads)
    exact_fp32(device)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, victim, seed) run up to the largest budget; evaluations on the way."""
    from . import data as data_mod
    from .engine import changed_settings, describe_run, run
    from .evaluate import Evaluator
    from .oracle import LocalOracle
    from .runs import RunFolder
    from .victim import Victim

    prepare_torch(job["threads"], job["device"])
    folder = RunFolder(job["run_dir"])
    victim = Victim.load(job["victim"])
    attack = build_attack(job["attack"], job["settings"], job["seed"], job["device"])
    from .defenses import build_defense

    defenses = [build_defense(spec) for spec in job.get("defenses", [])]
    oracle = LocalOracle(
        victim,
        budget=job["budget"],
        explanation=None,
        seed=job["seed"],
        device=job["device"],
        defenses=defenses,
        # An attack with on_device (megex.accel) sends its queries from the device.
        answer_on_device=attack.config.on_device and not defenses,
    )
    if folder.config_path.is_file() and not job["fresh"]:
        # A finished or interrupted run is reused only if it had these very settings.
        changed = changed_settings(folder, describe_run(attack, oracle, job["budget"]))
        if changed:
            raise ValueError(
                f"{folder.path} holds a run with other settings ({'; '.join(changed)}); "
                "pass --fresh to run it again, or choose another --out"
            )
    base = {**job, "victim_accuracy": victim.accuracy}
    if folder.is_finished() and not job["fresh"]:
        result = folder.read_result()
        return {
            **base,
            "metrics": result["metrics"],
            "wall_s": result["elapsed_s"],
            "skipped": True,
        }
    ds = data_mod.load(job["dataset"], job["data_root"])
    x_test, y_test = ds.test_tensors()
    evaluator = Evaluator.from_victim(victim, x_test, y_test)
    oracle.explanation = getattr(attack.config, "explanation", None)
    resume = folder.has_checkpoint() and not job["fresh"]
    if resume:
        # The service's ledger and noise continue where the interrupted run left them.
        oracle.load_state_dict(folder.load_checkpoint()["service"])
    start = time.time()
    result = run(
        attack,
        oracle,
        job["budget"],
        evaluator=evaluator,
        eval_every=job["budget"],
        eval_at=sorted({*job["budgets"], *job["eval_at"]}),
        run_dir=job["run_dir"],
        resume=resume,
        progress=job["progress"],
        service_state=oracle.state_dict,
    )
    if not result.finished:
        raise KeyboardInterrupt
    # A finished run needs no checkpoint (its replay buffer is most of the disk it takes).
    folder.checkpoint_path.unlink(missing_ok=True)
    return {
        **base,
        "metrics": result.metrics,
        "wall_s": round(time.time() - start, 1),
        "queries_used": oracle.queries_used,
        "skipped": False,
    }


# --- the benchmark ------------------------------------------------------------------------


def plan_dir(out: Path, args: argparse.Namespace) -> Path:
    """The folder of the benchmark's run folders."""
    return out.resolve() / ("runs-quick" if args.quick else "runs")


def finished_blocks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of the (seed, victim) pairs on which every planned method has finished."""
    from .runs import RunFolder

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
    device = args.device or config["device"]
    out, data_root = out.resolve(), args.data_root and str(Path(args.data_root).resolve())
    progress = not args.no_progress and (args.jobs or 1) == 1 and not getattr(args, "ray", None)
    chosen = {}
    for method in methods:
        require_tuned(config, method, tuned)
        chosen[method] = method_settings(config, method, tuned)
        if chosen[method][1].get("lr_schedule") != "constant":
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
                jobs.append(
                    {
                        "method": method,
                        "attack": attack,
                        "settings": settings,
                        "victim_seed": victim_seed,
                        "seed": seed,
                        "budget": max(budgets),
                        "budgets": budgets,
                        "eval_at": [b for b in config["eval_at"] if b < max(budgets)],
                        "name": f"{method} victim {victim_seed} seed {seed}",
                        # Absolute: workers (processes, Ray tasks) may start elsewhere.
                        "run_dir": str(runs_dir / f"{method}-v{victim_seed}-s{seed}"),
                        "victim": str(Path(victim).resolve()),
                        "dataset": config["dataset"],
                        "data_root": data_root,
                        "device": device,
                        "threads": args.threads,
                        "fresh": args.fresh,
                        "progress": progress,
                    }
                )
    return jobs


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the benchmark described by `args`; write JSON, markdown and PNG."""
    config = load_config(args.config)
    if args.device:
        config["device"] = args.device
    apply_settings_file(config, getattr(args, "settings_file", None))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    victim_seeds = args.victim_seeds or (
        config["quick_victim_seeds"] if args.quick else config["victim_seeds"]
    )
    # The settings are checked before any victim is trained (minutes on a CPU).
    plan(config, args, out, {s: out / "victims" / f"seed{s}" for s in victim_seeds})
    victims = {s: get_victim(config, out / "victims", args.data_root, s)[1] for s in victim_seeds}
    from . import sweep

    jobs = plan(config, args, out, victims)
    planned = len(jobs)
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
    _log(
        f"benchmark: {len(jobs)} runs {sweep.describe(args)}; run folders under "
        f"{plan_dir(out, args)}"
    )
    finished: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        finished.append(res)
        cells = cells_of(res)
        shown = ", ".join(f"{_fmt(b)}: {c['clone_accuracy']:.4f}" for b, c in cells.items())
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        _log(
            f"[{len(finished)}/{len(jobs)}] {res['method']} victim {res['victim_seed']} "
            f"seed {res['seed']} ({how}): {shown}"
        )

    options = sweep.options(args, config["device"])
    failures = sweep.run_jobs(jobs, args.jobs, done, run_one, shared=out, **options)
    if failures:
        # A table with runs missing would compare unequal sets: none is written.
        raise sweep.SweepFailed(failures, len(jobs))
    wall = time.time() - t0
    from .bench_report import summarise, write_outputs

    summary = summarise(finished, config, wall, args)
    stem = "query_efficiency_quick" if args.quick else "query_efficiency"
    if len(jobs) < planned:
        summary["partial"] = {"runs": len(jobs), "planned": planned}
        stem += "_partial"
    paths = write_outputs(summary, out, stem, plot=not args.no_plot)
    _log(f"benchmark: {wall:.0f} s wall time; wrote {', '.join(str(p) for p in paths)}")
    return summary


def cells_of(done: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The evaluation row for each budget of a run: the last one within that budget."""
    cells = {}
    for budget in done["budgets"]:
        rows = [r for r in done["metrics"] if r["queries"] <= budget]
        if rows:
            cells[budget] = rows[-1]
    return cells


def _fmt(b: int) -> str:
    if b >= 1_000_000 and b % 100_000 == 0:
        return f"{b / 1_000_000:g}M"
    return f"{b / 1000:g}k" if b >= 1000 else str(b)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
