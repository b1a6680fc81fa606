"""The trade-off's summary: for each defence row, the explanation utility it leaves honest
users and the clone accuracy it leaves each attacker, with paired differences against the
undefended row."""

from __future__ import annotations

import statistics
from typing import Any

from ...stats import bootstrap_interval, paired_difference
from ..runner import cells_of
from .rows import ADAPTIVE, row_name

__all__ = ["counted_variant", "summarise"]


Accuracy = dict[tuple[str, str], dict[int, dict[int, float]]]


def summarise(
    finished: list[dict[str, Any]],
    utility: dict[str, dict[int, dict[str, float]]],
    config: dict[str, Any],
    wall: float,
) -> dict[str, Any]:
    """The trade-off table from the finished runs and the utility measured per row."""
    budget, baseline = max(config["budgets"]), config["baseline"]
    accuracy, victim_accuracy = _accuracy_at(finished, budget)
    undefended_lead = _undefended_lead(accuracy, config)
    leading = [a for a, verdict in undefended_lead.items() if verdict == "a ahead"]
    rows_out = [_row(specs, accuracy, utility, config, leading) for specs in config["defenses"]]
    effective = [
        r["defense"] for r in rows_out if r["stops_explanation_attackers"] and r["keeps_utility"]
    ]
    return {
        "budget": budget,
        "budgets": sorted(config["budgets"]),
        "victims": {str(k): v for k, v in sorted(victim_accuracy.items())},
        "seeds": config["seeds"],
        "attackers": config["attackers"],
        "baseline": baseline,
        "utility_threshold": config["utility_threshold"],
        "tuned_settings": config["tuned_settings"],
        "undefended_lead": undefended_lead,
        "leading_attackers": leading,
        "rows": rows_out,
        "effective": effective,
        "wall_s": round(wall, 1),
        "runs": len(finished),
    }


def _accuracy_at(finished: list[dict[str, Any]], budget: int) -> tuple[Accuracy, dict]:
    """{(defence row, method): {victim: {seed: clone accuracy at `budget`}}}, and each
    victim's accuracy."""
    accuracy: Accuracy = {}
    victim_accuracy: dict[int, float] = {}
    for r in finished:
        cell = cells_of(r).get(budget)
        if cell is None:
            continue
        victim_accuracy[r["victim_seed"]] = r["victim_accuracy"]
        key = (r["defense_row"], r["method"])
        accuracy.setdefault(key, {}).setdefault(r["victim_seed"], {})[r["seed"]] = cell[
            "clone_accuracy"
        ]
    return accuracy, victim_accuracy


def _undefended_lead(accuracy: Accuracy, config: dict[str, Any]) -> dict[str, Any]:
    """Whether each explanation attacker (naive, or adaptive where it differs) is measurably
    ahead of the baseline without a defence: only such a lead can be stopped."""
    undefended_base = accuracy.get(("none", config["baseline"]), {})
    lead: dict[str, Any] = {}
    for attacker in config["attackers"]:
        diff = paired_difference(accuracy.get(("none", attacker), {}), undefended_base)
        lead[attacker] = diff.get("verdict") if diff.get("pairs", 0) > 1 else "too few runs"
    return lead


def _interval(values: Any) -> dict[str, float]:
    est, low, high = bootstrap_interval(values)
    return {"estimate": est, "low": low, "high": high}


def _attacker_entries(
    name: str, attacker: str, accuracy: Accuracy, base: Any, methods: dict[str, Any]
) -> bool | None:
    """Add the attacker's naive and adaptive entries under row `name` to `methods`; whether
    the defence stopped it (None: it did not run there)."""
    naive = accuracy.get((name, attacker), {})
    adaptive = accuracy.get((name, attacker + ADAPTIVE))
    undefended = accuracy.get(("none", attacker), {})
    for label, values in ((attacker, naive), (attacker + ADAPTIVE, adaptive)):
        if not values:
            continue
        methods[label] = {
            "accuracy": _interval(values),
            "minus_baseline": paired_difference(values, base),
            # What the defence took from this attacker (paired with its own
            # undefended runs: the naive attacker's, as nothing was there to adapt to).
            "minus_undefended": paired_difference(values, undefended),
        }
    variants = [v for v in (attacker, attacker + ADAPTIVE) if v in methods]
    if not variants:
        return None
    # The table and plot show the stronger variant by mean (an adaptation may not
    # help); a defence stops the attacker only if neither variant stays ahead.
    counted = max(variants, key=lambda v: methods[v]["accuracy"]["estimate"])
    verdicts = [methods[v]["minus_baseline"] for v in variants]
    stopped = all(d.get("pairs", 0) > 1 and d.get("verdict") != "a ahead" for d in verdicts)
    methods[counted]["counted"] = True
    methods[counted]["stopped"] = stopped
    return stopped


def _row(
    specs: list[str],
    accuracy: Accuracy,
    utility: dict[str, dict[int, dict[str, float]]],
    config: dict[str, Any],
    leading: list[str],
) -> dict[str, Any]:
    """One defence row: each attacker's accuracy and what the defence took, the baseline's
    accuracy, and the utility it leaves."""
    name, baseline = row_name(specs), config["baseline"]
    # Explanation defences leave DFME's answers as they were: its undefended runs.
    base = accuracy.get((name, baseline)) or accuracy.get(("none", baseline), {})
    methods: dict[str, Any] = {}
    stopped_all = True
    for attacker in config["attackers"]:
        stopped = _attacker_entries(name, attacker, accuracy, base, methods)
        if stopped is not None and attacker in leading:
            stopped_all = stopped_all and stopped
    if base:
        methods[baseline] = {"accuracy": _interval(base)}
    by_victim = utility.get(name, {})
    metrics = sorted({m for v in by_victim.values() for m in v})
    util = {m: statistics.fmean(v[m] for v in by_victim.values() if m in v) for m in metrics}
    return {
        "defense": name,
        "specs": specs,
        "utility": util,
        "methods": methods,
        # None: no attacker was ahead without a defence, so there is nothing to stop.
        "stops_explanation_attackers": (stopped_all if leading else None) if specs else False,
        "keeps_utility": util.get("cosine", 0.0) >= float(config["utility_threshold"]),
    }


def counted_variant(row: dict[str, Any], attacker: str) -> dict[str, Any] | None:
    """A summary row's entry for the variant of `attacker` that it counts (the stronger of
    naive and adaptive), or None where the attacker did not run under that defence."""
    for label in (attacker, attacker + ADAPTIVE):
        if row["methods"].get(label, {}).get("counted"):
            return row["methods"][label]
    return None
