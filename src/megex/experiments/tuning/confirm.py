"""The search's last step: each method's best trials scored again on more tuning seeds.

A search judges a trial on a few tuning seeds. A setting at the edge of stability (a clone
learning rate high enough that in some runs the clone settles on one class for good) can
score well on those seeds and fail on most others, and the benchmark then measures that
failure rather than the method. This step takes each method's `confirm_trials` best trials,
scores each on the `confirm_seeds` (more tuning seeds: the same tuning victim and validation
images, never a reporting seed, never the test split), and chooses the trial with the best
mean over all its seeds. Every method goes through the same step, so the tuning effort stays
equal. Each score is kept in the study as soon as it is known (a user attribute of the study
per trial and seed), so a step that stops resumes without scoring anything twice.
"""

from __future__ import annotations

import time
from typing import Any

from ..common import log
from . import published, trials
from .trials import curve_score, judged_trials, method_setup, open_storage

__all__ = ["confirm_key", "confirm_method", "validate"]


def validate(search: dict[str, Any]) -> None:
    """Refuse confirmation settings that would score a trial twice on one seed."""
    trials, seeds = search["confirm_trials"], list(search["confirm_seeds"])
    if trials and not seeds:
        raise ValueError("--confirm-seeds: expected at least one seed to confirm trials on")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--confirm-seeds: {seeds} repeats a seed")
    shared = sorted(set(seeds) & set(search["seeds"]))
    if shared:
        raise ValueError(
            f"--confirm-seeds: {shared} are already the search's tuning seeds "
            f"{list(search['seeds'])}; expected other seeds"
        )


def confirm_key(trial: int, seed: int) -> str:
    """The study attribute that holds trial `trial`'s score on confirmation seed `seed`."""
    return f"confirm trial {trial} seed {seed}"


def confirm_method(job: dict[str, Any]) -> dict[str, Any]:
    """Score one method's best trials on the confirmation seeds (those not scored yet);
    return the settings with the best mean over the search's seeds and these."""
    import optuna

    search, method = job["search"], job["method"]
    setup = method_setup(job)
    study = optuna.load_study(study_name=method, storage=open_storage(job["storage"]))
    judged = judged_trials(study, search["trials"])
    if not judged:
        raise ValueError(f"tune {method}: no finished trial to confirm")
    best_first = sorted(judged, key=lambda t: (-t.value, t.number))
    scored = []  # (trial, its row)
    for trial in best_first[: search["confirm_trials"]]:
        seed_scores = {
            str(seed): _confirmed_score(job, setup, study, trial, seed)
            for seed in search["confirm_seeds"]
        }
        scored.append((trial, _row(search, trial, seed_scores)))
    # Ties go to the trial the search ranked first.
    best, chosen = max(scored, key=lambda pair: pair[1]["mean"])
    return {
        "method": method,
        "params": best.params,
        "value": chosen["mean"],
        "trial": best.number,
        "trials": len(judged),
        "published": published.published_row(judged),
        "confirmation": {
            "chosen_by_search": best_first[0].number,
            "seeds": list(search["confirm_seeds"]),
            "rows": [row for _, row in scored],
        },
    }


def _confirmed_score(
    job: dict[str, Any],
    setup: tuple[Any, Any, str, dict[str, Any]],
    study: Any,
    trial: Any,
    seed: int,
) -> float:
    """A trial's score on one confirmation seed: kept in the study, or scored and kept."""
    search, method = job["search"], job["method"]
    victim, evaluator, attack_name, fixed = setup
    key = confirm_key(trial.number, seed)
    stored = study.user_attrs.get(key)
    if stored is None:
        t0 = time.time()
        value, curves = trials.score(
            method,
            {**fixed, **trial.params},
            attack_name,
            victim,
            evaluator,
            {**search, "seeds": [seed]},
            job["device"],
            pool=job["config"].get("pool"),
            data_root=job["data_root"],
        )
        stored = {"value": value, "curves": curves, "seconds": round(time.time() - t0, 1)}
        study.set_user_attr(key, stored)
        log(
            f"tune {method}: trial {trial.number} confirmed on seed {seed} -> "
            f"{value:.4f} ({stored['seconds']:.0f} s)"
        )
    return stored["value"]


def _row(search: dict[str, Any], trial: Any, seed_scores: dict[str, float]) -> dict[str, Any]:
    """A confirmed trial's row: its scores on every seed, the worst, and the mean."""
    searched = len(search["seeds"])
    # The search's score is the mean over its own seeds: weighted by their number, the
    # result is the mean over every seed the trial ran with.
    total = trial.value * searched + sum(seed_scores.values())
    # The worst seed of all: the search's seeds' scores come back from their curves.
    search_scores = {
        seed: curve_score(curve, search["marks"])
        for seed, curve in trial.user_attrs.get("curves", {}).items()
    }
    return {
        "trial": trial.number,
        "search_score": trial.value,
        "search_seed_scores": search_scores,
        "seed_scores": seed_scores,
        "worst_seed": min([*search_scores.values(), *seed_scores.values()]),
        "mean": total / (searched + len(seed_scores)),
    }
