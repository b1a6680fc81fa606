"""The benchmark's markdown table and plots, formatted from its summary alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ... import plots
from ...tables import markdown_table
from .. import common
from ..common import fmt_budget
from .summary import ci, interval_ends, is_assumption, saved_cell

__all__ = ["markdown", "plot_curves", "plot_reach", "write_outputs"]


def markdown(summary: dict[str, Any]) -> str:
    """The benchmark's tables: accuracy, paired differences, queries to reach each fraction,
    compute, the share of the spread due to the victim, and the methods with a prior."""
    stats = summary["stats"]
    free = [m for m in stats if not is_assumption(m)]
    assumed = [m for m in stats if is_assumption(m)]
    lines = _preamble(summary)
    lines += _table(summary, _accuracy_rows(summary, free))
    lines += _differences(summary, free)
    lines += _queries_to_reach(summary, free)
    lines += _compute(summary)
    lines += _spread(summary)
    if assumed:
        lines += _with_assumptions(summary, assumed)
    lines += [
        "",
        f"Wall time of this invocation {summary['wall_s']:.0f} s (finished runs are reused; "
        f"their own times are in the JSON's run_wall_s), runs {summary['runner']}, "
        f"{summary['threads_per_run']} thread(s) each.",
    ]
    return "\n".join(lines) + "\n"


def _table(summary: dict[str, Any], rows: list[list[str]]) -> list[str]:
    """A table with one row per method and one column per budget."""
    return markdown_table(["method", *(fmt_budget(b) for b in summary["budgets"])], rows)


def _preamble(summary: dict[str, Any]) -> list[str]:
    stats = summary["stats"]
    runs = max((s["runs"] for m in stats.values() for s in m.values()), default=0)
    victims, seeds = len(summary["victims"]), len(summary["seeds"])
    partial = summary.get("partial")
    lines = []
    if partial:
        lines += [
            f"**Partial: {partial['runs']} of the {partial['planned']} planned runs** (every "
            "method on the same victims and seeds; the benchmark has not finished).",
            "",
        ]
    return lines + [
        f"Clone test accuracy %, mean [95% interval] over {runs} run(s) ({victims} victim(s) "
        f"x {seeds} attack seed(s)), and x the victim's accuracy (victims "
        + ", ".join(f"{100 * a:.1f}%" for a in summary["victims"].values())
        + ")."
        + (
            f" The attacker's images: {summary['pool']} (each attack seed draws its own, the "
            "same for every method at that seed)."
            if summary.get("pool")
            else " Data-free: no prior on the images."
        ),
        "",
    ]


def _accuracy_rows(summary: dict[str, Any], methods: list[str]) -> list[list[str]]:
    stats, rows = summary["stats"], []
    for method in methods:
        cells = [method]
        for b in summary["budgets"]:
            s = stats[method].get(b)
            cells.append("-" if s is None else f"{ci(s['interval'])} ({s['ratio']:.2f}x)")
        rows.append(cells)
    return rows


def _difference_cell(d: dict[str, Any] | None) -> str:
    if not d or not d.get("pairs"):
        return "-"
    cell = ci({"estimate": d["mean"], "low": d["low"], "high": d["high"]})
    if not math.isnan(d.get("t_low", math.nan)):
        cell += f" (t: [{100 * d['t_low']:.1f}, {100 * d['t_high']:.1f}])"
    verdict = {
        "a ahead": "ahead",
        "b ahead": "behind",
        "one pair, no interval": "(one pair: no interval, no verdict)",
    }.get(d["verdict"], "no difference")
    return f"{cell} {verdict}"


def _difference_rows(summary: dict[str, Any], methods: list[str]) -> list[list[str]]:
    rows = []
    for method in methods:
        by_budget = summary["stats"][method]
        against = [by_budget.get(b, {}).get("vs_baseline") for b in summary["budgets"]]
        cells = [_difference_cell(vs) for vs in against]
        if any(c != "-" for c in cells):
            base = next(vs["baseline"] for vs in against if vs)
            rows.append([_against(method, base, summary["baseline"]), *cells])
    return rows


def _against(method: str, base: str, primary: str) -> str:
    """The row's name: the method, and what it is compared with where that is not the
    table's baseline (disguide for disguide-maps)."""
    return method if base == primary else f"{method} - {base}"


def _differences(summary: dict[str, Any], methods: list[str]) -> list[str]:
    base = summary["baseline"]
    return [
        "",
        f"Paired difference method - {base} (same victim, same seed; a row named 'method - "
        "other' is against that attacker without maps), points: mean [95% hierarchical "
        "bootstrap interval] (t: 95% Student t interval over the victims' mean differences); "
        "'ahead' or 'behind' only where both intervals exclude 0:",
        "",
        *_table(summary, _difference_rows(summary, methods)),
    ]


def _reach_cell(row: dict[str, Any] | None, base: str) -> str:
    if row is None:
        return "-"
    base = row.get("baseline", base)  # the method's own, where it has one
    if "median" not in row:
        return f"reached in {row['reached']}/{row['runs']} runs" + saved_cell(row, base)
    return ci(row["median"], scale=1, digits=0) + saved_cell(row, base)


def _queries_to_reach(summary: dict[str, Any], methods: list[str]) -> list[str]:
    base, reach = summary["baseline"], summary["queries_to_reach"]
    lines = [
        "",
        "Queries to reach a fraction of the victim's accuracy (median [95% interval]); "
        f"'{base} needs k x': the geometric mean over paired runs of {base}'s queries over the "
        "method's, with a 95% interval; '>= k x' (or '<= k x') where some of "
        f"{base}'s runs (or the method's) never reached the fraction within the largest "
        "budget and count as that budget, which makes k a lower (upper) bound:",
    ]
    rows = [
        [method, *(_reach_cell(by_method.get(method), base) for by_method in reach.values())]
        for method in methods
    ]
    return [*lines, "", *markdown_table(["method", *(f"{f}x" for f in reach)], rows)]


def _compute(summary: dict[str, Any]) -> list[str]:
    lines = ["", "Compute at each budget (mean per run): clone updates / generator updates / s:"]
    rows = []
    for method, by_budget in summary["stats"].items():
        cells = [method]
        for b in summary["budgets"]:
            s = by_budget.get(b)
            cells.append(
                "-"
                if s is None
                else f"{s['clone_updates']:.0f} / {s['generator_updates']:.0f} / "
                f"{s['elapsed_s']:.0f}"
            )
        rows.append(cells)
    return [*lines, "", *_table(summary, rows)]


def _spread(summary: dict[str, Any]) -> list[str]:
    lines = ["", "Where the spread comes from (share of the variance due to the victim):", ""]
    rows = []
    for method, by_budget in summary["stats"].items():
        cells = [method]
        for b in summary["budgets"]:
            share = by_budget.get(b, {}).get("spread", {}).get("victim_share")
            # Not estimable from one victim, or without a repeated seed on some victim.
            cells.append("-" if share is None else f"{100 * share:.0f}%")
        rows.append(cells)
    for method, by_budget in summary["stats"].items():
        # The same split of the paired differences: how much of a lead is the victim's.
        against = [by_budget.get(b, {}).get("vs_baseline") or {} for b in summary["budgets"]]
        if not any("spread" in vs for vs in against):
            continue
        cells = [f"{method} - {next(vs['baseline'] for vs in against if 'baseline' in vs)}"]
        for vs in against:
            share = vs.get("spread", {}).get("victim_share")
            cells.append("-" if share is None else f"{100 * share:.0f}%")
        rows.append(cells)
    return [*lines, *_table(summary, rows)]


def _with_assumptions(summary: dict[str, Any], assumed: list[str]) -> list[str]:
    lines = ["", "With an assumption about the domain (not data-free):", ""]
    lines += [f"- {tag}: {text}" for tag, text in summary["assumptions"].items()]
    lines += ["", *_table(summary, _accuracy_rows(summary, assumed))]
    compared = _difference_rows(summary, assumed)
    if compared:
        lines += [
            "",
            "Paired difference under the same assumption (megex-all+prior - dfme+prior, "
            "and so on), points, as above:",
            "",
            *_table(summary, compared),
        ]
    return lines


def write_outputs(
    summary: dict[str, Any], out: Path, stem: str = "query_efficiency", plot: bool = True
) -> list[Path]:
    """<stem>.json, .md, and (with `plot`) the accuracy and queries-to-reach PNGs."""
    plots = [("", plot_curves), ("_reach", plot_reach)] if plot else []
    return common.write_outputs(summary, out, stem, markdown, plots)


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plots.subplots(figsize=(7, 4.5))
    for method, by_budget in summary["stats"].items():
        budgets = sorted(by_budget)
        means = [100 * by_budget[b]["interval"]["estimate"] for b in budgets]
        lows = [100 * by_budget[b]["interval"]["low"] for b in budgets]
        highs = [100 * by_budget[b]["interval"]["high"] for b in budgets]
        if any(math.isnan(v) for v in lows):
            lows, highs = means, means
        err = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
        style = "--" if is_assumption(method) else "-"
        ax.errorbar(budgets, means, yerr=err, marker="o", capsize=3, ls=style, label=method)
    ax.axhline(100 * summary["victim_accuracy"], color="grey", ls=":", lw=1, label="victims")
    ax.set_xscale("log")
    ax.set_xlabel("queries")
    ax.set_ylabel("clone test accuracy (%), 95% interval")
    ax.set_title(f"Query efficiency on {summary['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(fig, path, dpi=120)


def plot_reach(summary: dict[str, Any], path: Path) -> Path:
    """Queries each method needs to reach each fraction of the victim (log axis): the
    leakage curve. Methods that did not reach a fraction in every run are left out there."""
    fig, ax = plots.subplots(figsize=(7, 4.5))
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
        style = "--" if is_assumption(method) else "-"
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
    return plots.save(fig, path, dpi=120)
