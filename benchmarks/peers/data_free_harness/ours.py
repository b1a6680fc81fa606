"""One run of ours (megex): ``dfme-paper`` (DFME as published: ``presets.DFME_PAPER``,
constant learning rate, generator width 64, no weight average), ``dfme`` (DFME's estimator in
megex's loop, with the benchmark's searched settings from the tuned-settings file),
``disguide-paper`` (our DisGUIDE with the settings of the authors' run script, see
DISGUIDE_PAPER) and ``disguide`` (our DisGUIDE with the benchmark's searched settings), each
through ``megex.engine.run`` with ``eval_at`` = the budgets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megex.engine import run as run_attack
from megex.evaluate import Evaluator
from megex.experiments.methods import build_attack, load_tuned, method_settings, require_tuned
from megex.experiments.query_efficiency.config import DEFAULTS
from megex.oracle import LocalOracle
from megex.victim import Victim

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


# Ours with the benchmark's searched settings (the others have fixed, published ones).
TUNED_METHODS = ("dfme", "disguide")


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
        require_tuned(config, method, tuned)
        return method_settings(config, method, tuned)
    if method == "dfme-paper":
        attack, settings = method_settings(DEFAULTS, "dfme-paper")
        if schedule == "published":
            settings["lr_schedule"] = "multistep"
        return attack, settings
    attack, settings = method_settings(DEFAULTS, "disguide")
    settings.update(DISGUIDE_PAPER)
    settings["replay_size"] = min(DISGUIDE_PAPER["replay_size"], budget)
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
