"""The benchmark's summary: per-budget intervals, paired differences, queries to a target.

Every figure is computed from the finished runs in one place (`summarise`); the markdown and
the plot only format it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .bench import ASSUMPTIONS, _fmt, cells_of, load_tuned, method_settings
from .evaluate import queries_to_reach
from .stats import Nested, bootstrap_interval, paired_difference, variance_components
from .sweep import describe

__all__ = ["markdown", "summarise", "write_outputs"]


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
    """What `method` is compared with: the baseline under the same assumption (dfme+prior
    for megex-all+prior), the plain baseline for a data-free method; None where the run
    has no such baseline (a prior is never weighed against a data-free run)."""
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
    stats: dict[str, Any] = {}
    for method, runs in by_method.items():
        stats[method] = {}
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
                "generator_updates": statistics.fmean(
                    c.get("generator_updates", 0) for c in cell_rows
                ),
                "elapsed_s": statistics.fmean(c["elapsed_s"] for c in cell_rows),
            }
            against = against_of[method]
            if against:
                base = _nested(
                    by_method[against],
                    lambda r, b=b: cells_of(r).get(b, {}).get("clone_accuracy"),
                )
                entry["vs_baseline"] = {"baseline": against, **paired_difference(accs, base)}
            stats[method][b] = entry
    reach: dict[str, Any] = {}
    for fraction in config["targets"]:
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
                row.update(_queries_saved(hits, base, runs, by_method[against]))
            reach[str(fraction)][method] = row
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


def _ci(i: dict[str, float], scale: float = 100, digits: int = 1) -> str:
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
            return f"; {base} needs {sign}{_ci(row[key], scale=1, digits=2)}x"
    return ""


def _is_assumption(method: str) -> bool:
    return any(tag in method for tag in ASSUMPTIONS)


def markdown(summary: dict[str, Any]) -> str:
    stats, budgets = summary["stats"], summary["budgets"]
    head = "| method | " + " | ".join(_fmt(b) for b in budgets) + " |"
    rule = "|" + " --- |" * (len(budgets) + 1)
    runs = max((s["runs"] for m in stats.values() for s in m.values()), default=0)
    victims = len(summary["victims"])
    seeds = len(summary["seeds"])
    partial = summary.get("partial")
    lines = []
    if partial:
        lines += [
            f"**Partial: {partial['runs']} of the {partial['planned']} planned runs** (every "
            "method on the same victims and seeds; the benchmark has not finished).",
            "",
        ]
    lines += [
        f"Clone test accuracy %, mean [95% interval] over {runs} run(s) ({victims} victim(s) "
        f"x {seeds} attack seed(s)), and x the victim's accuracy (victims "
        + ", ".join(f"{100 * a:.1f}%" for a in summary["victims"].values())
        + "). Data-free: no prior on the images.",
        "",
        head,
        rule,
    ]
    free = [m for m in stats if not _is_assumption(m)]
    assumed = [m for m in stats if _is_assumption(m)]

    def accuracy_rows(methods: list[str]) -> list[str]:
        rows = []
        for method in methods:
            cells = []
            for b in budgets:
                s = stats[method].get(b)
                cells.append("-" if s is None else f"{_ci(s['interval'])} ({s['ratio']:.2f}x)")
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
        return rows

    def difference_rows(methods: list[str]) -> list[str]:
        rows = []
        for method in methods:
            cells = []
            for b in budgets:
                d = stats[method].get(b, {}).get("vs_baseline")
                if not d or not d.get("pairs"):
                    cells.append("-")
                    continue
                interval = {"estimate": d["mean"], "low": d["low"], "high": d["high"]}
                cell = _ci(interval)
                if not math.isnan(d.get("t_low", math.nan)):
                    cell += f" (t: [{100 * d['t_low']:.1f}, {100 * d['t_high']:.1f}])"
                verdict = {
                    "a ahead": "ahead",
                    "b ahead": "behind",
                    "one pair, no interval": "(one pair: no interval, no verdict)",
                }.get(d["verdict"], "no difference")
                cells.append(f"{cell} {verdict}")
            if any(c != "-" for c in cells):
                rows.append(f"| {method} | " + " | ".join(cells) + " |")
        return rows

    lines += accuracy_rows(free)
    base = summary["baseline"]
    lines += [
        "",
        f"Paired difference method - {base} (same victim, same seed), points: mean "
        "[95% hierarchical bootstrap interval] (t: 95% Student t interval over the victims' "
        "mean differences); 'ahead' or 'behind' only where both intervals exclude 0:",
        "",
        head,
        rule,
    ]
    lines += difference_rows(free)
    lines += [
        "",
        "Queries to reach a fraction of the victim's accuracy (median [95% interval]); "
        f"'{base} needs k x': the geometric mean over paired runs of {base}'s queries over the "
        "method's, with a 95% interval; '>= k x' (or '<= k x') where some of "
        f"{base}'s runs (or the method's) never reached the fraction within the largest "
        "budget and count as that budget, which makes k a lower (upper) bound:",
    ]
    lines += ["", "| method | " + " | ".join(f"{f}x" for f in summary["queries_to_reach"]) + " |"]
    lines.append("|" + " --- |" * (len(summary["queries_to_reach"]) + 1))
    for method in free:
        cells = []
        for rows in summary["queries_to_reach"].values():
            row = rows.get(method)
            if row is None:
                cells.append("-")
            elif "median" not in row:
                cells.append(
                    f"reached in {row['reached']}/{row['runs']} runs" + saved_cell(row, base)
                )
            else:
                cells.append(_ci(row["median"], scale=1, digits=0) + saved_cell(row, base))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Compute at each budget (mean per run): clone updates / generator updates / s:"]
    lines += ["", head, rule]
    for method in stats:
        cells = []
        for b in budgets:
            s = stats[method].get(b)
            cells.append(
                "-"
                if s is None
                else f"{s['clone_updates']:.0f} / {s['generator_updates']:.0f} / "
                f"{s['elapsed_s']:.0f}"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Where the spread comes from (share of the variance due to the victim):", ""]
    lines += [head, rule]
    for method in stats:
        cells = []
        for b in budgets:
            share = stats[method].get(b, {}).get("spread", {}).get("victim_share")
            # Not estimable from one victim, or without a repeated seed on some victim.
            cells.append("-" if share is None else f"{100 * share:.0f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if assumed:
        lines += ["", "With an assumption about the domain (not data-free):", ""]
        lines += [f"- {tag}: {text}" for tag, text in summary["assumptions"].items()]
        lines += ["", head, rule] + accuracy_rows(assumed)
        compared = difference_rows(assumed)
        if compared:
            lines += [
                "",
                "Paired difference under the same assumption (megex-all+prior - dfme+prior, "
                "and so on), points, as above:",
                "",
                head,
                rule,
                *compared,
            ]
    lines += [
        "",
        f"Wall time of this invocation {summary['wall_s']:.0f} s (finished runs are reused; "
        f"their own times are in the JSON's run_wall_s), runs {summary['runner']}, "
        f"{summary['threads_per_run']} thread(s) each.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(
    summary: dict[str, Any], out: Path, stem: str = "query_efficiency", plot: bool = True
) -> list[Path]:
    from .runs import write_json_atomic, write_text_atomic

    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], markdown(summary))
    if plot:
        try:
            paths.append(plot_curves(summary, out / f"{stem}.png"))
            paths.append(plot_reach(summary, out / f"{stem}_reach.png"))
        except ImportError:
            print("plot: matplotlib is not installed (pip install 'megex[plots]'); PNG skipped")
    return paths


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_budget in summary["stats"].items():
        budgets = sorted(by_budget)
        means = [100 * by_budget[b]["interval"]["estimate"] for b in budgets]
        lows = [100 * by_budget[b]["interval"]["low"] for b in budgets]
        highs = [100 * by_budget[b]["interval"]["high"] for b in budgets]
        if any(math.isnan(v) for v in lows):
            lows, highs = means, means
        err = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
        style = "--" if _is_assumption(method) else "-"
        ax.errorbar(budgets, means, yerr=err, marker="o", capsize=3, ls=style, label=method)
    ax.axhline(100 * summary["victim_accuracy"], color="grey", ls=":", lw=1, label="victims")
    ax.set_xscale("log")
    ax.set_xlabel("queries")
    ax.set_ylabel("clone test accuracy (%), 95% interval")
    ax.set_title(f"Query efficiency on {summary['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from .runs import save_figure_atomic

    return save_figure_atomic(fig, path, dpi=120)


def plot_reach(summary: dict[str, Any], path: Path) -> Path:
    """Queries each method needs to reach each fraction of the victim (log axis): the
    leakage curve. Methods that did not reach a fraction in every run are left out there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fractions = sorted(float(f) for f in summary["queries_to_reach"])
    for method in summary["stats"]:
        points = []
        for f in fractions:
            row = summary["queries_to_reach"][str(f)].get(method, {})
            if "median" in row:
                m = row["median"]
                points.append((f, m["estimate"], *interval_ends(m)))
        if not points:
            continue
        fs, est, lows, highs = zip(*points)
        err = [[e - lo for e, lo in zip(est, lows)], [hi - e for e, hi in zip(est, highs)]]
        style = "--" if _is_assumption(method) else "-"
        ax.errorbar(est, fs, xerr=err, marker="o", capsize=3, ls=style, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("queries to reach (median, 95% interval)")
    ax.set_ylabel("fraction of the victim's accuracy")
    ax.set_title(f"Queries needed on {summary['dataset']}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no method reached a target in every run", ha="center",
                transform=ax.transAxes)  # fmt: skip
    fig.tight_layout()
    from .runs import save_figure_atomic

    return save_figure_atomic(fig, path, dpi=120)
