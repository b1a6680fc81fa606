"""The benchmark's summary: per-budget intervals, paired differences, queries to a target.

Every figure is computed from the finished runs in one place (`summarise`); the markdown and
the plot only format it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ...evaluate import queries_to_reach
from ...stats import Nested, bootstrap_interval, paired_difference, variance_components
from ..methods import ASSUMPTIONS, WITHOUT_MAPS, load_tuned, method_settings
from ..runner import cells_of
from ..sweep import describe

__all__ = ["SAVED_KINDS", "interval_ends", "is_assumption", "saved_cell", "summarise"]


def _nested(runs: list[dict[str, Any]], value) -> Nested:
    out: Nested = {}
    for r in runs:
        v = value(r)
        if v is not None:
            out.setdefault(r["victim_seed"], {})[r["seed"]] = v
    return out


def _reach(run: dict[str, Any], fraction: float) -> int | None:
    """Queries a run needed to reach `fraction` of its own victim's accuracy."""
    return queries_to_reach(run["metrics"], fraction * run["victim_accuracy"])


def _interval(data: Nested, statistic=statistics.fmean) -> dict[str, float]:
    est, low, high = bootstrap_interval(data, statistic)
    return {"estimate": est, "low": low, "high": high}


def _ratio_interval(logs: Nested) -> dict[str, float]:
    est, low, high = bootstrap_interval(logs)
    return {
        "estimate": math.exp(est),
        "low": math.exp(low) if not math.isnan(low) else math.nan,
        "high": math.exp(high) if not math.isnan(high) else math.nan,
    }


def _queries_saved(hits: Nested, base: Nested, runs: list, base_runs: list) -> dict[str, Any]:
    """The geometric mean over paired runs of baseline / method queries to a target (the
    queries saved by explanations): 'saved_x' where every run reached it. A run that never
    reached it needed more than its largest budget, so counting it as that budget bounds its
    pair's ratio from one side; where every such pair bounds it from the same side (only the
    baseline's runs missed: 'saved_x_at_least'; only the method's: 'saved_x_at_most'), the
    mean is that bound. Where both missed, the sides mix, or the two methods do not have the
    same (victim, seed) runs, nothing."""

    def budgets(of: list) -> dict[tuple, int]:
        return {(r["victim_seed"], r["seed"]): max(r["budgets"]) for r in of}

    mine, theirs = budgets(runs), budgets(base_runs)
    if set(mine) != set(theirs):
        return {}
    logs: Nested = {}
    sides = set()
    for (v, s), budget in mine.items():
        q, b = hits.get(v, {}).get(s), base.get(v, {}).get(s)
        if q is None and b is None:
            return {}
        if q is None or b is None:
            sides.add("at_least" if b is None else "at_most")
        logs.setdefault(v, {})[s] = math.log((b or theirs[(v, s)]) / (q or budget))
    if not sides:
        return {"saved_x": _ratio_interval(logs)}
    if len(sides) != 1:
        return {}
    return {f"saved_x_{sides.pop()}": _ratio_interval(logs)}


def baseline_for(method: str, baseline: str, methods: Any) -> str | None:
    """What `method` is compared with: the same attacker without maps where it is not the
    baseline (disguide for disguide-maps, WITHOUT_MAPS) and is in the runs; else the
    baseline under the same assumption (dfme+prior for megex-all+prior), the plain baseline
    for a data-free method; None where the run has no such baseline (a prior is never
    weighed against a data-free run)."""
    counterpart = WITHOUT_MAPS.get(method)
    if counterpart in methods:
        return counterpart
    tags = [tag for tag in ASSUMPTIONS if tag in method]
    other = baseline + "".join(tags)
    return other if other != method and other in methods else None


def summarise(finished: list, config: dict, wall: float, args: Any) -> dict[str, Any]:
    """Every figure of the tables, from the finished runs."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(finished, key=lambda r: (r["method"], r["victim_seed"], r["seed"])):
        by_method.setdefault(r["method"], []).append(r)
    budgets = sorted({b for r in finished for b in r["budgets"]})
    victims = {r["victim_seed"]: r["victim_accuracy"] for r in finished}
    baseline = config["baseline"]
    tuned = load_tuned(config)
    against_of = {m: baseline_for(m, baseline, by_method) for m in by_method}
    stats = {
        method: _budget_stats(runs, budgets, by_method, against_of[method])
        for method, runs in by_method.items()
    }
    reach = _reach_table(config["targets"], by_method, against_of)
    curves = {
        f"{r['method']}-v{r['victim_seed']}-s{r['seed']}": [
            [m["queries"], m["clone_accuracy"]] for m in r["metrics"]
        ]
        for r in finished
    }
    return {
        "dataset": config["dataset"],
        "victims": victims,
        "victim_accuracy": statistics.fmean(victims.values()),
        "seeds": sorted({r["seed"] for r in finished}),
        "baseline": baseline,
        "budgets": budgets,
        "settings": config["settings"],
        # Only with a pool, so that the data-free summaries stay as they were.
        **({"pool": config["pool"]} if config.get("pool") else {}),
        "method_settings": {m: method_settings(config, m, tuned)[1] for m in by_method},
        "tuned_settings": config.get("tuned_settings"),
        "assumptions": ASSUMPTIONS,
        "wall_s": round(wall, 1),
        "run_wall_s": {
            f"{r['method']}-v{r['victim_seed']}-s{r['seed']}": r["wall_s"] for r in finished
        },
        "threads_per_run": args.threads,
        "jobs": args.jobs,
        "runner": describe(args),
        "stats": stats,
        "queries_to_reach": reach,
        "curves": curves,
    }


def _budget_stats(
    runs: list[dict[str, Any]],
    budgets: list[int],
    by_method: dict[str, list[dict[str, Any]]],
    against: str | None,
) -> dict[int, dict[str, Any]]:
    """One method's clone accuracy at each budget its runs reached: mean, interval, spread,
    compute, and the paired difference with its baseline (`against`, if any)."""
    stats: dict[int, dict[str, Any]] = {}
    for b in budgets:
        accs = _nested(runs, lambda r, b=b: cells_of(r).get(b, {}).get("clone_accuracy"))
        if not accs:
            continue
        ratios = _nested(
            runs,
            lambda r, b=b: (
                cells_of(r).get(b, {}).get("clone_accuracy", math.nan) / r["victim_accuracy"]
            ),
        )
        cell_rows = [cells_of(r).get(b) for r in runs if cells_of(r).get(b)]
        flat = [v for s in accs.values() for v in s.values()]
        entry = {
            "runs": len(flat),
            "mean": statistics.fmean(flat),
            "std": statistics.stdev(flat) if len(flat) > 1 else 0.0,
            "interval": _interval(accs),
            "ratio": statistics.fmean(v for s in ratios.values() for v in s.values()),
            "spread": variance_components(accs),
            "clone_updates": statistics.fmean(c.get("clone_updates", 0) for c in cell_rows),
            "generator_updates": statistics.fmean(c.get("generator_updates", 0) for c in cell_rows),
            "elapsed_s": statistics.fmean(c["elapsed_s"] for c in cell_rows),
        }
        if against:
            base = _nested(
                by_method[against],
                lambda r, b=b: cells_of(r).get(b, {}).get("clone_accuracy"),
            )
            entry["vs_baseline"] = {"baseline": against, **paired_difference(accs, base)}
        stats[b] = entry
    return stats


def _reach_table(
    targets: list[float],
    by_method: dict[str, list[dict[str, Any]]],
    against_of: dict[str, str | None],
) -> dict[str, Any]:
    """Per target fraction of the victim's accuracy and method: the runs that reached it,
    their median queries, and the queries saved against the method's baseline."""
    reach: dict[str, Any] = {}
    for fraction in targets:
        reach[str(fraction)] = {}
        for method, runs in by_method.items():
            hits = _nested(runs, lambda r, f=fraction: _reach(r, f))
            flat = [v for s in hits.values() for v in s.values()]
            row: dict[str, Any] = {
                "reached": len(flat),
                "runs": len(runs),
                "per_run": {f"v{r['victim_seed']}-s{r['seed']}": _reach(r, fraction) for r in runs},
            }
            if len(flat) == len(runs) and flat:
                row["median"] = _interval(hits, statistics.median)
            against = against_of[method]
            if against:
                base = _nested(by_method[against], lambda r, f=fraction: _reach(r, f))
                row["baseline"] = against
                row.update(_queries_saved(hits, base, runs, by_method[against]))
            reach[str(fraction)][method] = row
    return reach


def ci(i: dict[str, float], scale: float = 100, digits: int = 1) -> str:
    if math.isnan(i["low"]):
        return f"{scale * i['estimate']:.{digits}f}"
    return (
        f"{scale * i['estimate']:.{digits}f} [{scale * i['low']:.{digits}f}, "
        f"{scale * i['high']:.{digits}f}]"
    )


# The kinds of queries-saved ratio (`_queries_saved`) and the sign each is written with:
# exact, a lower bound, an upper bound.
SAVED_KINDS = (("saved_x", ""), ("saved_x_at_least", ">= "), ("saved_x_at_most", "<= "))


def interval_ends(i: dict[str, float]) -> tuple[float, float]:
    """(low, high) of an interval, the estimate where it has none (one unit: NaN ends)."""
    low = i["low"] if not math.isnan(i["low"]) else i["estimate"]
    high = i["high"] if not math.isnan(i["high"]) else i["estimate"]
    return low, high


def saved_cell(row: dict[str, Any], base: str) -> str:
    """'; <base> needs k [low, high]x' for a queries-to-reach row, with '>=' or '<=' where
    the ratio is a bound (censored runs, `_queries_saved`); '' when there is none."""
    for key, sign in SAVED_KINDS:
        if row.get(key):
            return f"; {base} needs {sign}{ci(row[key], scale=1, digits=2)}x"
    return ""


def is_assumption(method: str) -> bool:
    return any(tag in method for tag in ASSUMPTIONS)
