"""One trial of the tuning search: the search space, how a trial's run is scored on
validation images, and the Optuna storage every worker shares (used by the search and by its
confirmation step)."""

from __future__ import annotations

import re
import socket
import statistics
from pathlib import Path
from typing import Any

from ... import data as data_mod
from ...attacks import POOL_ATTACKS
from ...engine import run
from ...evaluate import Evaluator
from ...oracle import LocalOracle
from ...pools import load_pool, victim_images
from ...victim import Victim
from ..methods import build_attack, method_settings, one_run_per_budget
from ..runner import cells_of, prepare_torch

__all__ = [
    "CLONE_DISAGREEMENT_ATTACKS",
    "SEARCH",
    "curve_score",
    "ideal_search_space",
    "is_published",
    "judged_trials",
    "method_setup",
    "open_storage",
    "score",
    "search_space",
    "storage_url",
]

SEARCH: dict[str, Any] = {
    "victim_seed": 100,
    "seeds": [100, 101],
    "budget": 100_000,
    "marks": [25_000, 50_000, 100_000],
    "trials": 20,
    "startup_trials": 8,
    # The confirmation step (:mod:`.confirm`): off here; the input-size sweep's searches
    # use it.
    "confirm_trials": 0,
    "confirm_seeds": [102, 103, 104],
    # Each method's published settings as one more trial (:mod:`.published`).
    "published_trial": True,
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
    if attack in POOL_ATTACKS:
        return pool_search_space(trial, attack)
    if attack in CLONE_DISAGREEMENT_ATTACKS:
        return clone_disagreement_search_space(trial, attack, pinned)
    if attack == "ideal":
        return ideal_search_space(trial, pinned)
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


# Data-free attacks whose generator learns from several clones' disagreement, no queries.
CLONE_DISAGREEMENT_ATTACKS = ("disguide", "dual-students", "disguide-maps")


def clone_disagreement_search_space(trial: Any, attack: str, pinned: Any = ()) -> dict[str, Any]:
    """The knobs searched for DisGUIDE, dual students and disguide-maps: the loop's shared
    ones that apply (their generator sends no queries, so neither training on its answers
    nor the victim's confidence does), the class-diversity weight and the number of clones
    (DFME's place: its directions and step), and the maps' weight; less what the method
    pins (dual students: two clones, no diversity term)."""
    params = {
        "generator_lr": trial.suggest_float("generator_lr", 1e-5, 1e-2, log=True),
        "clone_lr": trial.suggest_float("clone_lr", 0.01, 0.3, log=True),
        "clone_steps": trial.suggest_int("clone_steps", 1, 3),
        "replay_policy": trial.suggest_categorical("replay_policy", ["reservoir", "ring"]),
        "generator_restart_every": trial.suggest_categorical(
            "generator_restart_every", [0, 20_000, 50_000]
        ),
        "disagreement_until": trial.suggest_categorical("disagreement_until", [0, 20_000, 50_000]),
    }
    if "class_balance" not in pinned:
        params["class_balance"] = trial.suggest_float("class_balance", 0.01, 1.0, log=True)
    if "clones" not in pinned:
        params["clones"] = trial.suggest_categorical("clones", [2, 3, 4])
    if attack == "disguide-maps":
        params["explanation_loss"] = trial.suggest_float("explanation_loss", 0.0, 3.0)
    return params


def ideal_search_space(trial: Any, pinned: Any = ()) -> dict[str, Any]:
    """The knobs searched for IDEAL: the loop's shared ones that apply
    (its generator sends no queries and has no disagreement term), the generator's updates
    per batch (the authors' 5 and 30 among them; 30 at most, the compute bound), how often
    it is re-drawn (1: before every batch, the paper's), the information-entropy weight
    (the authors' 5 inside) and whose prediction it takes (each image's, the authors' code;
    the batch's, the paper's), and what the clone learns from (the paper's top-1 class or the
    probabilities); less what the method pins."""
    params = {
        "generator_lr": trial.suggest_float("generator_lr", 1e-4, 3e-2, log=True),
        "clone_lr": trial.suggest_float("clone_lr", 0.01, 0.3, log=True),
        "clone_steps": trial.suggest_int("clone_steps", 1, 3),
        "replay_policy": trial.suggest_categorical("replay_policy", ["reservoir", "ring"]),
        "generator_restart_every": trial.suggest_categorical(
            "generator_restart_every", [1, 2_000, 20_000, 0]
        ),
        "class_balance": trial.suggest_float("class_balance", 0.1, 30.0, log=True),
    }
    if "generator_steps" not in pinned:
        params["generator_steps"] = trial.suggest_categorical("generator_steps", [1, 5, 10, 30])
    if "clone_target" not in pinned:
        params["clone_target"] = trial.suggest_categorical(
            "clone_target", ["top1", "probabilities"]
        )
    if "information_of" not in pinned:
        params["information_of"] = trial.suggest_categorical("information_of", ["image", "batch"])
    return params


def pool_search_space(trial: Any, attack: str) -> dict[str, Any]:
    """The knobs searched for an attack with images: the clone's optimiser and batch, the
    distance it learns, and the attack's own (the maps' weight; JBDA's step)."""
    # Adam, around its usual rate: with the few trials every method gets, a range that
    # also holds SGD's rates spent most of them on clones that never learnt or diverged.
    params = {
        "clone_lr": trial.suggest_float("clone_lr", 3e-4, 3e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
        "clone_weight_decay": trial.suggest_categorical("clone_weight_decay", [0.0, 5e-4]),
        "loss": trial.suggest_categorical("loss", ["kl", "l1"]),
    }
    if attack.endswith("-maps"):
        params["explanation_loss"] = trial.suggest_float("explanation_loss", 0.1, 10.0, log=True)
    if attack.startswith("jbda"):
        params["step_size"] = trial.suggest_float("step_size", 0.01, 0.3, log=True)
        params["step_period"] = trial.suggest_categorical("step_period", [1, 3, 1000])
    return params


def score(
    method: str,
    settings: dict[str, Any],
    attack_name: str,
    victim: Any,
    evaluator: Any,
    search: dict[str, Any],
    device: str,
    pool: str | None = None,
    data_root: str | None = None,
) -> tuple[float, dict[str, Any]]:
    """Mean validation accuracy over the marks and tuning seeds, and the per-seed curves.
    An attack with images draws its `pool` (a megex.pools spec) with each tuning seed."""
    values, curves = [], {}
    # A clone that learns after all of a run's queries is measured by one run per mark.
    if one_run_per_budget(attack_name, settings):
        runs = [(mark, []) for mark in search["marks"]]
    else:
        runs = [(search["budget"], search["marks"])]
    for seed in search["seeds"]:
        images = None
        if attack_name in POOL_ATTACKS:
            if not pool:
                raise ValueError(f"{method}: an attack with images needs the config's 'pool'")
            images = load_pool(pool, victim_images(victim), seed=seed, data_root=data_root)
        curve = []
        for budget, marks in runs:
            attack = build_attack(attack_name, settings, seed, device, images)
            oracle = LocalOracle(
                victim,
                budget=budget,
                explanation=getattr(attack.config, "explanation", None),
                seed=seed,
                device=device,
            )
            result = run(
                attack,
                oracle,
                budget,
                evaluator=evaluator,
                eval_every=budget,
                eval_at=marks,
                progress=False,
            )
            if not result.finished:
                # Ctrl-C inside the run: a trial scored on part of its budget would be wrong.
                raise KeyboardInterrupt
            curve += [[r["queries"], r["clone_accuracy"]] for r in result.metrics]
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


def storage_url(args: Any) -> str:
    """The Optuna storage: --storage, or the SQLite file <out>/studies.db."""
    if args.storage:
        if "://" not in args.storage:
            raise ValueError(
                f"--storage: {args.storage!r} is not a database URL (sqlite:///PATH, "
                "postgresql://USER@HOST/DB, mysql://USER@HOST/DB)"
            )
        return args.storage
    return f"sqlite:///{Path(args.out).resolve() / 'studies.db'}"


def public_url(url: str) -> str:
    """The storage URL without its password (for logs and the output file)."""
    return re.sub(r"//[^@/]*@", "//", url)


def portable_url(url: str) -> str:
    """The storage URL as the output file records it: a SQLite file under the working
    folder by its relative path, so that the record holds in any checkout."""
    url = public_url(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.is_relative_to(Path.cwd()):
            return f"sqlite:///{path.relative_to(Path.cwd())}"
    return url


def open_storage(url: str):
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
    `trials` finished searched ones by number (parallel workers may finish a few more), and
    its published settings' trial where the study has it (:mod:`.published`)."""
    import optuna

    complete = optuna.trial.TrialState.COMPLETE
    finished = sorted(study.get_trials(deepcopy=False, states=(complete,)), key=lambda t: t.number)
    published = [t for t in finished if is_published(t)]
    searched = [t for t in finished if not is_published(t)][:trials]
    return sorted(searched + published, key=lambda t: t.number)


def is_published(trial: Any) -> bool:
    """Whether a trial of a study is its method's published settings (:mod:`.published`
    queues it with this mark)."""
    return bool(trial.user_attrs.get("published"))
