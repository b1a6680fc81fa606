"""The audit's figures, from its finished runs: per threat model the benchmark's own summary
(megex.experiments.query_efficiency.summary, computed the same way) read into the report's
rows, and per defence what it cost honest users and what it took from the attackers."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ...stats import bootstrap_interval, paired_difference
from ..common import fmt_budget
from ..runner import cells_of
from .plan import ThreatModel

__all__ = ["defence_row", "interval_of", "threat_model_summary"]


def interval_of(values: dict[int, float]) -> dict[str, float] | None:
    """Mean over seeds and its bootstrap interval (one victim); None without values."""
    if not values:
        return None
    if len(values) == 1:
        (v,) = values.values()
        return {"estimate": v, "low": math.nan, "high": math.nan}
    est, low, high = bootstrap_interval({0: values})
    return {"estimate": est, "low": low, "high": high}


def _difference(a: dict[int, float], b: dict[int, float]) -> dict[str, float] | None:
    d = paired_difference({0: a}, {0: b})
    if not d.get("pairs"):
        return None
    low, high = (d["low"], d["high"]) if d["pairs"] > 1 else (math.nan, math.nan)
    return {"estimate": d["mean"], "low": low, "high": high}


def _at(runs: list[dict[str, Any]], method: str, budget: int) -> dict[int, float]:
    """Clone accuracy per seed of `method` at `budget`."""
    out = {}
    for r in runs:
        cell = cells_of(r).get(budget) if r["method"] == method else None
        if cell:
            out[r["seed"]] = cell["clone_accuracy"]
    return out


def threat_model_summary(
    tm: ThreatModel, bench: dict[str, Any], runs: list[dict[str, Any]], victim_accuracy: float
) -> dict[str, Any]:
    """One threat model's section of the report, from the benchmark summary of its
    undefended runs (`bench`) and those runs (merged per method and seed)."""
    rows = []
    for b in tm.budgets:
        base, att = _at(runs, tm.baseline, b), _at(runs, tm.attacker, b)
        rows.append(
            {
                "budget": b,
                "baseline": interval_of(base),
                "attacker": interval_of(att),
                "difference": _difference(att, base),
            }
        )
    section = {
        "key": tm.key,
        "title": tm.title,
        "pool": None,
        "baseline": tm.baseline,
        "attacker": tm.attacker,
        "budgets": list(tm.budgets),
        "seeds": bench["seeds"],
        "accuracy": rows,
        "leakage": [_leakage(bench, tm, t) for t in sorted(bench["queries_to_reach"], key=float)],
        "curves": _curves(runs, tm),
        "settings": {m: bench["method_settings"].get(m, {}) for m in tm.methods},
    }
    section["verdict"] = verdict(section, victim_accuracy)
    return section


def _leakage(bench: dict[str, Any], tm: ThreatModel, target: str) -> dict[str, Any]:
    reach = bench["queries_to_reach"][target]
    base, att = reach.get(tm.baseline, {}), reach.get(tm.attacker, {})
    factor, bound = None, None
    for key, name in (
        ("saved_x", "exact"),
        ("saved_x_at_least", "at_least"),
        ("saved_x_at_most", "at_most"),
    ):
        if key in att:
            factor, bound = att[key], name
    return {
        "target": float(target),
        "baseline_reached": base.get("reached", 0),
        "attacker_reached": att.get("reached", 0),
        "runs": att.get("runs", 0),
        "baseline_median_queries": _median(base),
        "attacker_median_queries": _median(att),
        "factor": factor,
        "bound": bound,
    }


def _median(row: dict[str, Any]) -> float | None:
    return row["median"]["estimate"] if "median" in row else None


def _curves(runs: list[dict[str, Any]], tm: ThreatModel) -> dict[str, list[list[float]]]:
    """Per method, at each evaluation: queries, mean clone accuracy over seeds and its
    interval (evaluations at the same query count across seeds)."""
    curves = {}
    for method in tm.methods:
        by_queries: dict[int, dict[int, float]] = {}
        for r in runs:
            if r["method"] == method:
                for m in r["metrics"]:
                    by_queries.setdefault(int(m["queries"]), {})[r["seed"]] = m["clone_accuracy"]
        points = []
        for q, values in sorted(by_queries.items()):
            i = interval_of(values)
            if i is not None:
                points.append([q, i["estimate"], i["low"], i["high"]])
        curves[method] = points
    return curves


def _points(d: dict[str, float]) -> str:
    def p(v: float) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:+.1f}"

    return f"{p(d['estimate'])} points [{p(d['low'])}, {p(d['high'])}]"


def verdict(section: dict[str, Any], victim_accuracy: float) -> str:
    """One plain sentence: the lead at the largest budget, and what the maps save."""
    top = section["accuracy"][-1]
    b, a, d = top["baseline"], top["attacker"], top["difference"]
    budget = fmt_budget(top["budget"])
    if not (a and b):
        return f"Not every method finished at {budget} queries; nothing to compare."
    figures = f"{100 * a['estimate']:.1f}% against {100 * b['estimate']:.1f}%"
    if d is None or math.isnan(d["low"]):
        text = f"At {budget} queries the clone with maps reaches {figures} (no interval)."
    elif d["low"] > 0:
        text = (
            f"The maps help: at {budget} queries the clone with maps reaches {figures} for "
            f"predictions alone ({_points(d)})."
        )
    elif d["high"] < 0:
        text = (
            f"At {budget} queries the clone with maps is behind predictions alone: {figures} "
            f"({_points(d)})."
        )
    else:
        text = (
            f"No measurable difference at {budget} queries: {figures} with and without maps "
            f"({_points(d)})."
        )
    return f"{text} {_saving(section['leakage'])}"


def _saving(leakage: list[dict[str, Any]]) -> str:
    """What the maps save to reach a target: the highest target with an exact factor, else
    the highest with a bound; said from the side of whichever attacker needs fewer."""
    rows = [r for r in leakage if r["factor"] is not None]
    if not rows:
        return "Neither reaches 0.8x of the victim in every run: no query factor."
    exact = [r for r in rows if r["bound"] == "exact"]
    r = (exact or rows)[-1]
    f, bound = r["factor"], r["bound"]
    goal = f"To reach {r['target']:g}x of the victim"
    if f["estimate"] >= 1:
        word = {"exact": "", "at_least": "at least ", "at_most": "at most "}[bound]
        return (
            f"{goal}, predictions alone need {word}{f['estimate']:.2f}x "
            f"[{f['low']:.2f}, {f['high']:.2f}] the queries of the map attacker."
        )
    # The map attacker needs more: the inverse factor, its bound turned round.
    word = {"exact": "", "at_least": "at most ", "at_most": "at least "}[bound]
    return (
        f"{goal}, the map attacker needs {word}{1 / f['estimate']:.2f}x "
        f"[{1 / f['high']:.2f}, {1 / f['low']:.2f}] the queries of predictions alone."
    )


def defence_row(
    spec: str,
    kind: str,
    utility: dict[str, Any],
    tm: ThreatModel,
    undefended: list[dict[str, Any]],
    defended: list[dict[str, Any]],
) -> dict[str, Any]:
    """One defence at the threat model's largest budget: what honest users keep (utility),
    each attacker's accuracy, what the defence took from it (paired by seed), and the map
    attacker's lead over predictions alone under it (the baseline's undefended runs stand
    for it under a defence of the maps alone, which does not change its answers)."""
    attackers: dict[str, Any] = {}
    under: dict[str, dict[int, float]] = {}
    for method in tm.methods:
        before = _at(undefended, method, tm.top)
        after = _at(defended, method, tm.top)
        if not after:
            if kind == "explanation" and method == tm.baseline:
                under[method] = before
            continue
        under[method] = after
        attackers[method] = {
            "accuracy": interval_of(after),
            "taken": _difference(before, after),
        }
    lead = None
    if tm.attacker in under and tm.baseline in under:
        lead = _difference(under[tm.attacker], under[tm.baseline])
    row = {"spec": spec, "kind": kind, **utility, "attackers": attackers, "lead": lead}
    row["verdict"] = _defence_verdict(row, tm)
    return row


def _defence_verdict(row: dict[str, Any], tm: ThreatModel) -> str:
    taken = (row["attackers"].get(tm.attacker) or {}).get("taken")
    lead = row["lead"]
    parts = []
    if taken and not math.isnan(taken["low"]):
        if taken["low"] > 0:
            parts.append(f"Takes {_points(taken)} from the map attacker")
        else:
            parts.append("Takes no measurable accuracy from the map attacker")
    if lead and not math.isnan(lead["low"]):
        if lead["low"] > 0:
            parts.append(f"the maps still lead under it ({_points(lead)})")
        elif lead["high"] < 0:
            parts.append(f"the map attacker is behind predictions alone ({_points(lead)})")
        else:
            parts.append("no measurable lead of the maps under it")
    change = row.get("accuracy_change")
    if change is not None and abs(change) >= 0.0005:
        parts.append(f"honest users' top-1 accuracy changes by {100 * change:+.1f} points")
    if not parts:
        return "Too few runs to say."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None
