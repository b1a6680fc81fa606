"""The threat models an audit measures, each as a config of the query-efficiency benchmark
on the one victim audited, with the settings the package ships.

- Data-free (no images of the domain): DFME, the strongest predictions-only attacker here,
  against the MEGEX variant that uses the explanation the service returns (predicted-class
  gradient maps measured strongest in the benchmark).
- With the attacker's images (`--pool`): Knockoff Nets against Knockoff Nets whose clone
  also matches every answered gradient map.

Settings are the benchmark's searched ones (`tuned/`: Fashion-MNIST LeNet-5 victims,
validation images, equal trials per method), shipped with the package; the report says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import SHARED_SETTINGS
from ..methods import METHODS, load_tuned, method_settings
from ..query_efficiency import DEFAULTS as BENCH_DEFAULTS
from .plan import ThreatModel
from .victims import AuditTarget

__all__ = [
    "DATA_FREE_ATTACKER",
    "DEFAULT_BUDGETS",
    "TUNED",
    "bench_config",
    "threat_models",
    "with_tuned",
]

TUNED = Path(__file__).parent / "tuned"

# The data-free map attacker for each explanation method a service may return.
DATA_FREE_ATTACKER = {
    "gradient": "megex-predicted",
    "smoothgrad": "megex-smoothgrad",
    "integrated_gradients": "megex-jacobian-integrated_gradients",
    "input_x_gradient": "megex-jacobian-input_x_gradient",
}
# The largest data-free budget by dataset: where DFME's clone is well on its way on 2 cores
# in minutes (digits: 0.97 of the victim at 20k queries; Fashion-MNIST: about 0.7 at 100k).
DEFAULT_BUDGETS = {"digits": 20_000}
DEFAULT_BUDGET = 100_000
TARGETS = [0.8, 0.9, 0.95]


def threat_models(
    target: AuditTarget,
    explanation: str,
    budget: int | None,
    pool: str | None,
    pool_budget: int,
) -> tuple[list[ThreatModel], list[dict[str, str]]]:
    """The threat models to measure, and the parts skipped with why."""
    skipped: list[dict[str, str]] = []
    if not target.explanations:
        why = "the service returns no explanations: there are no maps to measure"
        skipped.append({"part": "data-free map attacker", "why": why})
        if pool:
            skipped.append({"part": "map attacker with images", "why": why})
        return [], skipped
    top = budget or DEFAULT_BUDGETS.get(target.dataset, DEFAULT_BUDGET)
    models = [
        _model(
            "data-free",
            "Data-free attacker (no images of the domain)",
            "dfme",
            DATA_FREE_ATTACKER[explanation],
            _spread(top, (10, 4, 2, 1)),
            None,
        )
    ]
    if pool and explanation != "gradient":
        skipped.append(
            {
                "part": "attacker with images",
                "why": f"its map attacker matches gradient maps; the service returns {explanation}",
            }
        )
    elif pool:
        models.append(
            _model(
                "with-images",
                f"Attacker with images ({pool})",
                "knockoff",
                "knockoff-maps",
                _spread(pool_budget, (10, 10 / 3, 1)),
                pool,
            )
        )
    return models, skipped


def _spread(top: int, divisors: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(top / d)) for d in divisors}))


def _model(
    key: str, title: str, baseline: str, attacker: str, budgets: tuple[int, ...], pool: Any
) -> ThreatModel:
    attacks = {m: METHODS[m]["attack"] for m in (baseline, attacker)}
    return with_tuned(ThreatModel(key, title, baseline, attacker, budgets, pool, attacks), None)


def with_tuned(tm: ThreatModel, tuned: str | None) -> ThreatModel:
    """The threat model with its methods' settings read from `tuned` (None: the shipped
    search's file)."""
    tm = dataclasses.replace(tm, tuned=tuned)
    config = for_threat_model(tm, "unused", [0])
    found = load_tuned(config)
    settings = {m: method_settings(config, m, found)[1] for m in tm.methods}
    return dataclasses.replace(tm, settings=settings)


def for_threat_model(
    tm: ThreatModel, dataset: str, seeds: list[int], pool_images: int = 0
) -> dict[str, Any]:
    """The benchmark config of a planned threat model."""
    return bench_config(
        tm.key, tm.baseline, tm.attacker, tm.budgets, tm.pool, dataset, seeds, pool_images,
        tm.tuned,
    )  # fmt: skip


def tuned_file(key: str) -> Path:
    return TUNED / f"{key}.json"


def settings_source(key: str) -> str:
    """Where a threat model's settings come from, in words."""
    tuned = json.loads(tuned_file(key).read_text())
    search = tuned.get("search", {})
    return (
        f"the settings megex ships ({tuned.get('source', tuned_file(key).name)}), searched on "
        f"{tuned.get('dataset', 'fashion-mnist')} validation images of a tuning victim, "
        f"{search.get('trials', '?')} trials per method to {search.get('budget', '?')} queries; "
        "not searched on this victim"
    )


def bench_config(
    key: str,
    baseline: str,
    attacker: str,
    budgets: tuple[int, ...] | list[int],
    pool: str | None,
    dataset: str,
    seeds: list[int],
    pool_images: int = 0,
    tuned: str | None = None,
) -> dict[str, Any]:
    """The benchmark config (megex.experiments.query_efficiency) of one threat model, its
    settings from `tuned` (None: the shipped search's file)."""
    top = max(budgets)
    config = json.loads(json.dumps(BENCH_DEFAULTS))
    settings = dict(SHARED_SETTINGS)
    if pool:
        # As the benchmark of the attackers with images (benchmarks/configs/pool-1k.json).
        settings["clone_updates_per_1k_queries"] = 1000.0
    config.update(
        dataset=dataset,
        victim_seeds=[0],
        seeds=list(seeds),
        validation_images=0,
        pool=pool,
        pool_images=pool_images,
        budgets=list(budgets),
        # Evaluations below the budgets, for the queries needed to reach a target.
        eval_at=[] if pool else sorted({max(1, round(top / d)) for d in (40, 20)}),
        methods=[attacker],
        assumption_methods=[],
        baseline=baseline,
        targets=TARGETS,
        settings=settings,
        tuned_settings=tuned or str(tuned_file(key)),
        method_settings={},
    )
    return config
