"""One run of ours (megex): ``dfme-paper`` (DFME as published: ``presets.DFME_PAPER``,
constant learning rate, generator width 64, no weight average), ``dfme`` (DFME's estimator in
megex's loop, with the benchmark's searched settings from the tuned-settings file),
``disguide-paper`` (our DisGUIDE with the settings of the authors' run script, see
DISGUIDE_PAPER), ``disguide`` (our DisGUIDE with the benchmark's searched settings),
``dual-students-paper`` (our dual students with the settings of its authors' run script, see
DUAL_STUDENTS_PAPER) and ``dual-students`` (with the benchmark's searched settings), each
through ``megex.engine.run`` with ``eval_at`` = the budgets. ``dfme-published``,
``disguide-published`` and ``dual-students-published`` are the trial of each method's search
that holds its published settings (``megex.experiments.tuning.published``): the paper's
values of the searched knobs, the benchmark's shared settings (generator width, replay,
clone updates per query, weight average) for the rest; beside the ``-paper`` row (the
paper's settings throughout) and the tuned one, they tell which of the two a gap between
those comes from.

A tuned method whose settings the tuned-settings file does not hold yet (its search has not
finished) is not run: its row is "unavailable", as a peer's that is not there, and a later
run with the same ``--out`` runs it once the file holds them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megex.engine import run as run_attack
from megex.evaluate import Evaluator
from megex.experiments.methods import METHODS, build_attack, load_tuned, method_settings
from megex.experiments.query_efficiency.config import DEFAULTS
from megex.experiments.tuning.published import published_params
from megex.oracle import LocalOracle
from megex.victim import Victim

from .errors import PeerUnavailable

# The settings of lin-tan/disguide's run_cifar-10.sh in megex's names: batch 256, student
# SGD lr 0.03 (momentum 0.9, weight decay 5e-4: the package's), generator Adam 1e-4, lambda
# 0.2, two students, one query batch per iteration, 3 replayed batches per iteration from
# a FIFO ring of 1M answers (each replayed batch trains both students: 2 fresh + 6 replayed
# updates per 256 queries = 31.25 per 1,000), soft labels (L1 on recovered logits), no
# weight average; decays x0.3 at 40% and 80% of the run under --schedule published.
DISGUIDE_PAPER: dict[str, Any] = {
    "batch_size": 256,
    "clone_lr": 0.03,
    "generator_lr": 1e-4,
    "class_balance": 0.2,
    "clones": 2,
    "clone_steps": 1,
    "replay_size": 1_000_000,
    "replay_policy": "ring",
    "clone_updates_per_1k_queries": 31.25,
    "ngf": 64,
    "nz": 256,
    "clone_ema": 0.0,
    "loss": "l1",
    "lr_milestones": (0.4, 0.8),
    "lr_gamma": 0.3,
}

# The settings of James-Beetham/dual_students's run_cifar_ds.sh in megex's names (the
# parser's defaults where the script sets none): batch 256 (default), student SGD lr 0.3
# (--lr_S; momentum 0.9, weight decay 5e-4: the defaults, and the package's), generator Adam
# 1e-4 (--lr_G), two students (--num_students 2) and the generator ascending the mean
# absolute difference of their logits (--generator_loss l1, default), no class-balance term,
# one generator step (--g_iter 1) then 5 query batches (--d_iter 5) per iteration, each
# batch training both students once (10 updates per 1,280 queries, nothing replayed: no
# replay memory), soft labels (--loss l1 on mean-corrected log-probabilities), generator
# width 64 and latent 256 (GeneratorA's and --nz's defaults); the first student's weight
# average evaluated (--combine_student_outputs first, --student_momentum 0.9 every 10
# iterations: a decay of 0.9 per 50 updates, 0.9 ** (1 / 50) = 0.9979 per update); decays
# x0.3 at 10%, 30% and 50% of the run under --schedule published (--steps, --scale). Not
# carried over: their generator step shows the students its images before tanh.
DUAL_STUDENTS_PAPER: dict[str, Any] = {
    "batch_size": 256,
    "clone_lr": 0.3,
    "generator_lr": 1e-4,
    "clones": 2,
    "discrepancy": "logit_l1",
    "class_balance": 0.0,
    "generator_steps": 1,
    "clone_steps": 5,
    "replay_size": 0,
    "clone_updates_per_1k_queries": 0.0,
    "loss": "l1",
    "ngf": 64,
    "nz": 256,
    "evaluated": "first",
    "clone_ema": 0.9979,
    "lr_milestones": (0.1, 0.3, 0.5),
    "lr_gamma": 0.3,
}


# Ours with the benchmark's searched settings (the others have fixed, published ones).
TUNED_METHODS = ("dfme", "disguide", "dual-students")
# Ours at the search's published-settings trial: row name -> the method searched.
PUBLISHED_TRIAL = {f"{m}-published": m for m in TUNED_METHODS}


class TunedSettingsMissing(PeerUnavailable):
    """The tuned-settings file does not hold a tuned method's settings yet: its row is not
    run (reported as unavailable, not as a failure)."""


def searched_settings(method: str, tuned_path: Path) -> dict[str, Any]:
    """What the tuned-settings file holds for `method`: a row's plan names these, not the
    whole file, so a search that goes on for other methods leaves finished rows valid."""
    tuned = load_tuned({"tuned_settings": str(tuned_path)})
    return (tuned.get("methods") or {}).get(method, {})


def ours_settings(
    method: str, budget: int, schedule: str, tuned_path: Path
) -> tuple[str, dict[str, Any]]:
    """(attack, settings) of one of our methods."""
    if method in TUNED_METHODS:
        config = {**DEFAULTS, "tuned_settings": str(tuned_path)}
        tuned = load_tuned(config)
        if method not in (tuned.get("methods") or {}):
            raise TunedSettingsMissing(
                f"--tuned: {tuned_path} has no settings for {method!r} yet (its search has "
                "not finished); a later run with this --out runs it once the file has them"
            )
        return method_settings(config, method, tuned)
    if method in PUBLISHED_TRIAL:
        searched = PUBLISHED_TRIAL[method]
        attack, settings = method_settings(DEFAULTS, searched)
        settings.update(published_params(searched, attack, METHODS[searched])[0])
        return attack, settings
    if method == "dfme-paper":
        attack, settings = method_settings(DEFAULTS, "dfme-paper")
        if schedule == "published":
            settings["lr_schedule"] = "multistep"
        return attack, settings
    if method == "disguide-paper":
        attack, settings = method_settings(DEFAULTS, "disguide")
        settings.update(DISGUIDE_PAPER)
        settings["replay_size"] = min(DISGUIDE_PAPER["replay_size"], budget)
    elif method == "dual-students-paper":
        attack, settings = method_settings(DEFAULTS, "dual-students")
        settings.update(DUAL_STUDENTS_PAPER)
    else:
        raise ValueError(f"unknown method of ours: {method!r}")
    settings["lr_schedule"] = "multistep" if schedule == "published" else "constant"
    return attack, settings


class _TimedEvaluator:
    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.seconds = 0.0

    def __call__(self, clone: nn.Module) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return self.evaluator(clone)
        finally:
            self.seconds += time.perf_counter() - start


def evaluations_at(
    marks: list[int], metrics: list[dict[str, Any]], iteration_cost: int
) -> list[dict[str, Any]]:
    """The last evaluation within each budget of `marks`, or why there is none."""
    evaluations = []
    for mark in marks:
        within = [r for r in metrics if r["queries"] <= mark]
        if within:
            last = within[-1]
            evaluations.append(
                {
                    "budget": mark,
                    "queries": last["queries"],
                    **{k: last[k] for k in ("clone_accuracy", "fidelity") if k in last},
                }
            )
        else:
            evaluations.append(
                {
                    "budget": mark,
                    "queries": 0,
                    "clone_accuracy": None,
                    "reason": f"less than one iteration ({iteration_cost} queries)",
                }
            )
    return evaluations


def run_ours(
    method: str,
    victim: Victim,
    seed: int,
    budgets: list[int],
    evaluator: Evaluator,
    schedule: str,
    tuned_path: Path,
) -> dict[str, Any]:
    """One of our methods through megex.engine.run, evaluated at every budget."""
    budget = budgets[-1]
    attack_name, settings = ours_settings(method, budget, schedule, tuned_path)
    torch.manual_seed(seed)
    attack = build_attack(attack_name, settings, seed, "cpu")
    oracle = LocalOracle(victim, budget=budget, explanation=None, seed=seed, device="cpu")
    timed = _TimedEvaluator(evaluator)
    start = time.perf_counter()
    result = run_attack(
        attack,
        oracle,
        budget,
        evaluator=timed,
        eval_every=budget,
        eval_at=budgets,
        progress=False,
    )
    wall_s = time.perf_counter() - start
    train_s = max(wall_s - timed.seconds, 1e-9)
    return {
        "evaluations": evaluations_at(budgets, result.metrics, attack.iteration_cost()),
        "queries_counted": oracle.queries_used,
        "wall_s": round(wall_s, 3),
        "evaluation_s": round(timed.seconds, 3),
        "queries_per_s": round(oracle.queries_used / train_s, 1),
        "settings": {
            "attack": attack_name,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        },
        "adapted": [],
    }
