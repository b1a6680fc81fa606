"""What an audit runs, what that costs, and how it is cut to a time limit.

A plan is a few threat models (the data-free attacker; with `--pool`, the attacker who holds
images), each a predictions-only baseline against a map attacker at a few budgets, every
method on the same attack seeds; then the defences, each run at the threat model's largest
budget. Its cost is estimated from measured seconds per query (megex.experiments.audit.
calibrate) and fitted to a time limit by dropping, in order: defences (last asked first),
seeds above three, each threat model's largest budget (while it keeps two), seeds above two.
Every cut is a sentence the report prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..common import fmt_budget
from ..methods import one_run_per_budget

__all__ = [
    "AuditPlan",
    "PlanTooLong",
    "ThreatModel",
    "estimate_seconds",
    "fit_to_time_limit",
    "runs_of",
]

# Seconds a run costs besides its queries (a worker process, loading the victim and the
# test split, the final evaluation): measured on 2 cores, rounded up.
RUN_OVERHEAD_S = 3.0


@dataclass(frozen=True)
class ThreatModel:
    """One attacker's view: `baseline` (predictions only) against `attacker` (with maps), at
    `budgets`, with `pool` (the attacker's images; None: data-free)."""

    key: str
    title: str
    baseline: str
    attacker: str
    budgets: tuple[int, ...]
    pool: str | None = None
    # Attack names (megex.attacks) of the two methods, for how they spend their budget.
    attacks: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The tuned-settings file the methods' settings come from (None: the shipped one).
    tuned: str | None = None

    @property
    def methods(self) -> tuple[str, str]:
        return (self.baseline, self.attacker)

    @property
    def top(self) -> int:
        return max(self.budgets)

    def queries_of(self, method: str) -> list[int]:
        """The budgets of one method's runs on one seed: one run to the largest budget, or
        one per budget for a clone that learns after all its queries."""
        attack = self.attacks.get(method, method)
        if one_run_per_budget(attack, self.settings.get(method, {})):
            return list(self.budgets)
        return [self.top]


@dataclass(frozen=True)
class AuditPlan:
    threat_models: tuple[ThreatModel, ...]
    seeds: tuple[int, ...]
    defenses: tuple[str, ...] = ()
    # Defences that change the predictions (so that the baseline is run under them too).
    prediction_defenses: frozenset[str] = frozenset()

    def describe(self) -> str:
        """The plan in one line per threat model."""
        lines = []
        for tm in self.threat_models:
            budgets = ", ".join(fmt_budget(b) for b in tm.budgets)
            lines.append(
                f"{tm.key}: {tm.baseline} against {tm.attacker} at {budgets} queries, "
                f"{len(self.seeds)} seeds"
            )
        if self.defenses:
            lines.append(f"defences at each largest budget: {', '.join(self.defenses)}")
        return "\n".join(lines)


def runs_of(plan: AuditPlan) -> list[tuple[str, str, int, int, str | None]]:
    """Every run of the plan: (threat model, method, seed, budget, defence or None)."""
    runs = []
    for tm in plan.threat_models:
        for seed in plan.seeds:
            for method in tm.methods:
                runs += [(tm.key, method, seed, q, None) for q in tm.queries_of(method)]
            for spec in plan.defenses:
                methods = tm.methods if spec in plan.prediction_defenses else (tm.attacker,)
                runs += [(tm.key, m, seed, tm.top, spec) for m in methods]
    return runs


def estimate_seconds(plan: AuditPlan, rates: dict[str, dict[str, float]], jobs: int = 1) -> float:
    """The plan's wall time: each run's queries at its method's measured seconds per query
    (`rates[threat model][method]`) plus a fixed cost, shared among `jobs` workers."""
    total = sum(
        RUN_OVERHEAD_S + rates[key][method] * budget for key, method, _, budget, _ in runs_of(plan)
    )
    return total / max(1, jobs)


class PlanTooLong(ValueError):
    """The smallest plan does not fit the time limit."""


def fit_to_time_limit(
    plan: AuditPlan, rates: dict[str, dict[str, float]], limit_s: float | None, jobs: int = 1
) -> tuple[AuditPlan, list[str]]:
    """The plan cut until its estimate fits `limit_s` (None: no limit), and each cut as a
    sentence. Raises PlanTooLong, with what the smallest plan needs, when nothing fits."""
    cuts: list[str] = []

    def fits(p: AuditPlan) -> bool:
        return limit_s is None or estimate_seconds(p, rates, jobs) <= limit_s

    while not fits(plan):
        step = _next_cut(plan, rates)
        if step is None:
            needed = estimate_seconds(plan, rates, jobs)
            smallest = plan.describe().replace("\n", "; ")
            raise PlanTooLong(
                f"--time-limit: the smallest audit ({smallest}) needs about "
                f"{_minutes(needed)}; allow at least that, or lower --budget"
            )
        plan, cut = step
        cuts.append(cut)
    return plan, cuts


def _next_cut(plan: AuditPlan, rates: dict[str, dict[str, float]]) -> tuple[AuditPlan, str] | None:
    if plan.defenses:
        dropped = plan.defenses[-1]
        return (
            dataclasses.replace(plan, defenses=plan.defenses[:-1]),
            f"defence {dropped} not run (time limit)",
        )
    if len(plan.seeds) > 3:
        return _fewer_seeds(plan)
    trimmable = [tm for tm in plan.threat_models if len(tm.budgets) > 2]
    if trimmable:
        costly = max(trimmable, key=lambda tm: sum(rates[tm.key][m] for m in tm.methods) * tm.top)
        kept = tuple(b for b in costly.budgets if b != costly.top)
        models = tuple(
            dataclasses.replace(tm, budgets=kept) if tm is costly else tm
            for tm in plan.threat_models
        )
        return (
            dataclasses.replace(plan, threat_models=models),
            f"{costly.key}: budget {fmt_budget(costly.top)} not run (time limit); the largest "
            f"is {fmt_budget(max(kept))}",
        )
    if len(plan.seeds) > 2:
        return _fewer_seeds(plan)
    return None


def _fewer_seeds(plan: AuditPlan) -> tuple[AuditPlan, str]:
    seeds = plan.seeds[:-1]
    return (
        dataclasses.replace(plan, seeds=seeds),
        f"{len(seeds)} attack seeds instead of {len(plan.seeds)} (time limit): wider intervals",
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
