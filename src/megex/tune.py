"""The tuning search: the same number of trials for every method, off the test set.

Each method's own knobs (DFME's included) are searched with Optuna's TPE sampler, every
method given the same number of trials at the same reduced budget. A trial attacks a tuning
victim (a recipe seed the benchmark never uses) with tuning seeds (never the reporting
ones), and is scored on validation images held out of the victim's training split: the
mean validation accuracy of the clone at a few query marks (which rewards getting there
early as well as far). The test split is never read.

Studies live in one Optuna storage (by default the SQLite file `<out>/studies.db`), so a
search that stops continues where it stopped: trials that finished are kept, a trial cut
short is run again (Optuna's heartbeat marks it failed, and the retry callback re-queues
it). The best settings per method are written to `<out>/tuned.json`, which the benchmark
reads.

Distributed (megex.sweep: local processes, or Ray tasks with --ray): each method's study
is worked on by `--parallel-trials` workers at once, each an ordinary Optuna worker that
asks the shared storage for its next trial (TPE with the constant liar, so that workers do
not propose the same point). This is Optuna with a shared storage rather than Ray Tune: the
study stays the one resumable record that the benchmark and a person read, whatever ran it;
the same code runs with or without Ray; Optuna's heartbeats re-queue the trial of a worker
that died; and Ray Tune would add a second experiment state (and its pandas and pyarrow
dependencies) for trials that each report once. The storage must be one that every worker
reaches: the SQLite file serves processes on one machine (a local Ray instance included);
on a cluster of several machines, pass a database URL with `--storage`
(postgresql://... or mysql://..., the driver installed). Optuna's journal file, which works
on a shared filesystem, is not offered: it has no heartbeats, so a trial on a worker that
died would stay running for ever. Every method is judged on the same number of trials: its
first `--trials` finished trials by number (parallel workers may finish a few more).

With `--confirm-trials N` (megex.tune_confirm), each method's N best trials are then scored
on more tuning seeds and the best mean over all seeds is chosen: a setting that scored well
on the search's few seeds by luck does not reach the benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import tune_confirm
from .bench import (
    METHODS,
    build_attack,
    cells_of,
    get_victim,
    method_settings,
    prepare_torch,
)

__all__ = ["SEARCH", "add_arguments", "main", "run_search", "search_space"]

SEARCH: dict[str, Any] = {
    "victim_seed": 100,
    "seeds": [100, 101],
    "budget": 100_000,
    "marks": [25_000, 50_000, 100_000],
    "trials": 20,
    "startup_trials": 8,
    # The confirmation step (megex.tune_confirm): off here; the input-size sweep's searches
    # use it.
    "confirm_trials": 0,
    "confirm_seeds": [102, 103, 104],
    "methods": [
        "megex-all",
        "megex-predicted",
        "megex-smoothgrad",
        "dfme",
        "megex-jacobian",
        "megex-jacobian-predicted",
    ],
}


def search_space(trial: Any, attack: str, pinned: Any = ()) -> dict[str, Any]:
    """The knobs searched for an attack: the loop's shared ones, then the attack's own,
    less those the method pins (e.g. a method defined by asking for maps on every query)."""
    params = {
        "generator_lr": trial.suggest_float("generator_lr", 1e-4, 5e-2, log=True),
        "clone_lr": trial.suggest_float("clone_lr", 0.01, 0.3, log=True),
        "clone_steps": trial.suggest_int("clone_steps", 1, 3),
        "train_on_generator_queries": trial.suggest_categorical(
            "train_on_generator_queries", [True, False]
        ),
        "replay_policy": trial.suggest_categorical("replay_policy", ["reservoir", "ring"]),
        "generator_restart_every": trial.suggest_categorical(
            "generator_restart_every", [0, 20_000, 50_000]
        ),
        "victim_confidence": trial.suggest_float("victim_confidence", 0.0, 3.0),
        "disagreement_until": trial.suggest_categorical("disagreement_until", [0, 20_000, 50_000]),
    }
    if attack == "dfme":
        params["directions"] = trial.suggest_categorical("directions", [1, 2, 5, 10])
        params["epsilon"] = trial.suggest_float("epsilon", 1e-4, 1e-1, log=True)
    else:
        params["explanation_loss"] = trial.suggest_float("explanation_loss", 0.0, 3.0)
        if "explain_clone_queries" not in pinned:
            params["explain_clone_queries"] = trial.suggest_categorical(
                "explain_clone_queries", [True, False]
            )
    return params


def score(
    method: str,
    settings: dict[str, Any],
    attack_name: str,
    victim: Any,
    evaluator: Any,
    search: dict[str, Any],
    device: str,
) -> tuple[float, dict[str, Any]]:
    """Mean validation accuracy over the marks and tuning seeds, and the per-seed curves."""
    from .engine import run
    from .oracle import LocalOracle

    values, curves = [], {}
    for seed in search["seeds"]:
        attack = build_attack(attack_name, settings, seed, device)
        oracle = LocalOracle(
            victim,
            budget=search["budget"],
            explanation=getattr(attack.config, "explanation", None),
            seed=seed,
            device=device,
        )
        result = run(
            attack,
            oracle,
            search["budget"],
            evaluator=evaluator,
            eval_every=search["budget"],
            eval_at=search["marks"],
            progress=False,
        )
        if not result.finished:
            # Ctrl-C inside the run: a trial scored on part of its budget would be wrong.
            raise KeyboardInterrupt
        curve = [[r["queries"], r["clone_accuracy"]] for r in result.metrics]
        values.append(curve_score(curve, search["marks"]))
        curves[str(seed)] = curve
    return statistics.fmean(values), curves


def curve_score(curve: list[list[float]], marks: list[int]) -> float:
    """One seed's score: the mean validation accuracy at the marks, each read as the
    benchmark reads a budget (the last evaluation within it; 0 where there is none).
    `curve` is the [queries, clone accuracy] pairs that a trial keeps in its "curves"."""
    rows = [{"queries": q, "clone_accuracy": acc} for q, acc in curve]
    cells = cells_of({"budgets": marks, "metrics": rows})
    return statistics.fmean(cells.get(m, {}).get("clone_accuracy", 0.0) for m in marks)


def storage_url(args: argparse.Namespace) -> str:
    """The Optuna storage: --storage, or the SQLite file <out>/studies.db."""
    if args.storage:
        if "://" not in args.storage:
            raise ValueError(
                f"--storage: {args.storage!r} is not a database URL (sqlite:///PATH, "
                "postgresql://USER@HOST/DB, mysql://USER@HOST/DB)"
            )
        return args.storage
    return f"sqlite:///{Path(args.out).resolve() / 'studies.db'}"


def _public(url: str) -> str:
    """The storage URL without its password (for logs and the output file)."""
    return re.sub(r"//[^@/]*@", "//", url)


def _portable(url: str) -> str:
    """The storage URL as the output file records it: a SQLite file under the working
    folder by its relative path, so that the record holds in any checkout."""
    url = _public(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.is_relative_to(Path.cwd()):
            return f"sqlite:///{path.relative_to(Path.cwd())}"
    return url


def _storage(url: str):
    import warnings

    import optuna
    from optuna import storages

    # Heartbeats (what lets a killed trial be retried) are marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
        retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(2)}
    else:
        retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=2)}
    return storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **retry)


def method_setup(job: dict[str, Any]) -> tuple[Any, Any, str, dict[str, Any]]:
    """(tuning victim, validation evaluator, attack name, the method's fixed settings) for a
    worker of one method's search."""
    from . import data as data_mod
    from .evaluate import Evaluator
    from .victim import Victim

    prepare_torch(job["threads"], job["device"])
    config = job["config"]
    if job["storage"].startswith("sqlite:") and socket.gethostname() != job["host"]:
        raise ValueError(
            f"--storage: the SQLite file {job['storage']} serves one machine, and this worker "
            f"runs on {socket.gethostname()}, not {job['host']}; pass a database URL that "
            "every machine reaches (postgresql://..., mysql://...)"
        )
    victim = Victim.load(job["victim"])
    ds = data_mod.load(config["dataset"], job["data_root"])
    x_val, y_val = ds.validation_tensors(config["validation_images"])
    evaluator = Evaluator.from_victim(victim, x_val, y_val)
    attack_name, fixed = method_settings(config, job["method"])
    return victim, evaluator, attack_name, fixed


def judged_trials(study: Any, trials: int) -> list[Any]:
    """The trials a method is judged on, the same number for every method: its first
    `trials` finished ones by number (parallel workers may finish a few more)."""
    import optuna

    complete = optuna.trial.TrialState.COMPLETE
    finished = study.get_trials(deepcopy=False, states=(complete,))
    return sorted(finished, key=lambda t: t.number)[:trials]


def search_method(job: dict[str, Any]) -> dict[str, Any]:
    """Run the remaining trials of one method's study; return its best settings."""
    import optuna

    search, method = job["search"], job["method"]
    victim, evaluator, attack_name, fixed = method_setup(job)
    study = optuna.create_study(
        study_name=method,
        storage=_storage(job["storage"]),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(
            seed=job["sampler_seed"],
            n_startup_trials=search["startup_trials"],
            # Workers that share a study: running trials count as their worst, so that two
            # workers do not propose the same point.
            constant_liar=job["parallel"] > 1,
        ),
    )

    def objective(trial: Any) -> float:
        params = search_space(trial, attack_name, pinned=METHODS[method])
        t0 = time.time()
        value, curves = score(
            method, {**fixed, **params}, attack_name, victim, evaluator, search, job["device"]
        )
        trial.set_user_attr("curves", curves)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        _log(f"tune {method}: trial {trial.number} -> {value:.4f} ({time.time() - t0:.0f} s)")
        return value

    complete = optuna.trial.TrialState.COMPLETE
    done = len(study.get_trials(deepcopy=False, states=(complete,)))
    if done < search["trials"]:
        _log(f"tune {method}: {done} of {search['trials']} trials done; running the rest")
        study.optimize(
            objective,
            callbacks=[optuna.study.MaxTrialsCallback(search["trials"], states=(complete,))],
        )
    judged = judged_trials(study, search["trials"])
    best = max(judged, key=lambda t: t.value)
    return {
        "method": method,
        "params": best.params,
        "value": best.value,
        "trial": best.number,
        "trials": len(judged),
    }


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="benchmark config JSON (dataset, validation, settings)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument("--out", default="benchmarks/results/tuning", help="studies and output")
    parser.add_argument(
        "--trials", type=int, help=f"trials per method (default {SEARCH['trials']})"
    )
    parser.add_argument("--budget", type=int, help=f"queries per trial run ({SEARCH['budget']})")
    parser.add_argument("--methods", nargs="+", help="methods to search (default: all)")
    from . import sweep

    parser.add_argument(
        "--confirm-trials",
        type=lambda text: sweep.positive(text, 0),
        help="score each method's N best trials again on the --confirm-seeds and choose by "
        f"the mean over all seeds (default {SEARCH['confirm_trials']}: the search's best)",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        nargs="+",
        help=f"tuning seeds of that step (default {SEARCH['confirm_seeds']})",
    )

    parser.add_argument(
        "--parallel-trials",
        type=sweep.positive,
        default=1,
        help="workers on each method's study at once (each runs one trial at a time)",
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage URL every worker reaches (default: sqlite:///OUT/studies.db, "
        "for one machine; on a cluster postgresql://... or mysql://...)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    sweep.add_arguments(parser, "trial workers")
    return parser


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from . import sweep
    from .bench import load_config

    config = load_config(args.config)
    config["tuned_settings"] = None  # the search starts from the untuned settings
    search = dict(SEARCH)
    if args.trials:
        search["trials"] = args.trials
    if args.budget:
        search["budget"] = args.budget
        search["marks"] = [m for m in search["marks"] if m < args.budget] + [args.budget]
    if args.confirm_trials is not None:
        search["confirm_trials"] = args.confirm_trials
    if args.confirm_seeds:
        search["confirm_seeds"] = args.confirm_seeds
    tune_confirm.validate(search)
    methods = args.methods or search["methods"]
    for method in methods:
        if method not in METHODS or "tuned_as" in METHODS[method]:
            raise ValueError(
                f"--methods: {method!r} is not a searched method; expected one of "
                f"{', '.join(m for m in METHODS if 'tuned_as' not in METHODS[m])}"
            )
    device = args.device or config["device"]
    out, url = Path(args.out).resolve(), storage_url(args)
    _, vpath = get_victim(config, out / "victims", args.data_root, search["victim_seed"])
    jobs = [
        {
            "name": f"tune {m} worker {k}",
            "method": m,
            "config": config,
            "search": search,
            "victim": str(vpath),
            "data_root": args.data_root and str(Path(args.data_root).resolve()),
            "storage": url,
            "host": socket.gethostname(),
            "device": device,
            "threads": args.threads,
            "parallel": args.parallel_trials,
            # One worker per method keeps the seeds of a search run without parallel trials.
            "sampler_seed": i + 1000 * k,
            "worker": k,
        }
        for i, m in enumerate(methods)
        for k in range(args.parallel_trials)
    ]
    # The database and its studies are made here, once: two workers creating the same
    # schema at once collide.
    try:
        import optuna
    except ModuleNotFoundError:
        message = "the search needs Optuna: pip install 'megex[tune]'"
        raise ModuleNotFoundError(message, name="optuna") from None

    storage = _storage(url)
    for method in methods:
        optuna.create_study(
            study_name=method, storage=storage, direction="maximize", load_if_exists=True
        )
    del storage
    t0 = time.time()
    tuned_path = out / "tuned.json"
    doc: dict[str, Any] = {}

    confirming = search["confirm_trials"] > 0

    def finished(res: dict[str, Any]) -> None:
        # Written as each worker finishes (the last of a method's workers sees all its
        # trials), so a long search leaves what it has; with a confirmation step, only once
        # that step has chosen.
        nonlocal doc
        if confirming and "confirmation" not in res:
            _log(f"tune {res['method']}: search's best {res['value']:.4f} (trial {res['trial']})")
            return
        doc = _record(tuned_path, config, search, url, res)
        _log(f"tune {res['method']}: best {res['value']:.4f} (trial {res['trial']})")

    _log(f"tune: {len(jobs)} trial workers {sweep.describe(args)}; studies in {_public(url)}")
    options = sweep.options(args, device)
    failures = sweep.run_jobs(jobs, args.jobs, finished, search_method, shared=out, **options)
    if failures:
        raise sweep.SweepFailed(failures, len(jobs), "trial workers")
    if confirming:
        # One job per method, after every trial of every method has finished.
        checks = [{**job, "name": f"tune {job['method']} confirmation"} for job in jobs
                  if job["worker"] == 0]  # fmt: skip
        failures = sweep.run_jobs(
            checks, args.jobs, finished, tune_confirm.confirm_method, shared=out, **options
        )
        if failures:
            raise sweep.SweepFailed(failures, len(checks), "confirmation jobs")
    _log(f"tune: {time.time() - t0:.0f} s; best settings in {tuned_path}")
    return doc


def _record(
    path: Path, config: dict[str, Any], search: dict[str, Any], url: str, res: dict[str, Any]
) -> dict[str, Any]:
    """Add one method's best settings to the search's output file (atomically)."""
    from .runs import write_json_atomic

    doc = json.loads(path.read_text()) if path.is_file() else {}
    method = res["method"]
    doc.update(
        {
            "description": "Settings chosen by megex.tune: validation images, tuning victim "
            "and seeds only; the benchmark reads them.",
            "dataset": config["dataset"],
            "validation_images": config["validation_images"],
            "search": search,
            "study": _portable(url),
        }
    )
    for key, value in (("methods", res["params"]), ("validation_score", res["value"]),
                       ("trials", res["trials"])):  # fmt: skip
        doc.setdefault(key, {})[method] = value
    # The methods this file holds settings for (searched by this call or an earlier one),
    # not the default list.
    doc["search"] = {**search, "methods": list(doc["methods"])}
    if "confirmation" in res:
        doc.setdefault("confirmation", {})[method] = res["confirmation"]
    else:
        doc.get("confirmation", {}).pop(method, None)
    write_json_atomic(path, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    """`megex tune` (benchmarks/tune.py calls this), with the exit statuses of megex.cli."""
    from .cli import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
