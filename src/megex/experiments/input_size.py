"""The input-size sweep: the query-efficiency benchmark at several input dimensions.

DFME must estimate the generator's gradient from m random directions, and such an estimate
aligns with the true gradient as roughly sqrt(m / d) (:mod:`megex.experiments.gradient_alignment`
measures it), so explanations, which give the gradient for one query, should pay more as
the input dimension d grows. The sweep runs the benchmark (`megex bench`) with
``<configs>/dim-<size>.json`` for each size in turn, into ``<out>/<size>/`` (each resumes
where it stopped), then writes one table across sizes: clone accuracy at the largest
budget, and the queries each method needs to reach each fraction of the victim, with how
many times more DFME (m = 1) needs. Settings do not carry over between sizes, so a size
whose config has a `search` block first runs that search (`megex tune`, the same trials and
budget at every size) into ``<out>/<size>/tuning/``, and its benchmark reads the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import plots
from ..tables import markdown_table
from . import common
from .query_efficiency.summary import SAVED_KINDS, interval_ends, saved_cell

__all__ = ["SEARCH_KEYS", "SIZES", "check_search", "combine", "markdown", "write_outputs"]

# size name -> (dataset, input dimension d = C * H * W)
SIZES: dict[str, tuple[str, int]] = {
    "14": ("fashion-mnist-14", 14 * 14),
    "28": ("fashion-mnist", 28 * 28),
    "56": ("fashion-mnist-56", 56 * 56),
    "colour-56": ("fashion-mnist-colour-56", 3 * 56 * 56),
}


# What a config's `search` block may hold: the methods to search, then the search's own
# settings, as `megex tune` options.
SEARCH_KEYS = ("methods", "trials", "budget", "confirm_trials", "confirm_seeds")


def check_search(search: Any, name: str) -> None:
    """Refuse a `search` block that the sweep would misread, before anything runs."""
    if not isinstance(search, dict):
        raise ValueError(f"{name}: 'search' must be an object, got {search!r}")
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(
            f"{name}: 'search' has unknown keys {unknown}; expected {', '.join(SEARCH_KEYS)}"
        )
    methods = search.get("methods")
    if not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)):
        raise ValueError(
            f"{name}: 'search' needs 'methods', a list of the method names to search, "
            f"got {methods!r}"
        )


def combine(out: Path, sizes: list[str], stem: str = "query_efficiency") -> dict[str, Any]:
    """The figures across sizes, from each size's benchmark summary (sizes not yet run are
    left out)."""
    rows = []
    for size in sizes:
        path = Path(out) / size / f"{stem}.json"
        if not path.is_file():
            continue
        bench = json.loads(path.read_text())
        largest = max(bench["budgets"])
        methods = {}
        for method, by_budget in bench["stats"].items():
            cell = by_budget.get(str(largest)) or by_budget.get(largest)
            methods[method] = {
                "accuracy": cell["interval"] if cell else None,
                "ratio": cell["ratio"] if cell else None,
                "reach": {
                    target: {
                        key: value for key, value in by_method[method].items() if key != "per_run"
                    }
                    for target, by_method in bench["queries_to_reach"].items()
                    if method in by_method
                },
            }
        dataset, d = SIZES[size]
        rows.append(
            {
                "size": size,
                "dataset": dataset,
                "d": d,
                "victim_accuracy": bench["victim_accuracy"],
                "budget": largest,
                "baseline": bench["baseline"],
                "methods": methods,
                "source": str(path),
            }
        )
    return {"stem": stem, "sizes": rows}


def _interval(i: dict[str, float], scale: float, digits: int) -> str:
    if i is None:
        return "-"
    if math.isnan(i["low"]):
        return f"{scale * i['estimate']:.{digits}f}"
    return (
        f"{scale * i['estimate']:.{digits}f} [{scale * i['low']:.{digits}f}, "
        f"{scale * i['high']:.{digits}f}]"
    )


def markdown(summary: dict[str, Any]) -> str:
    """One row per size and method: accuracy at the largest budget, queries to each target."""
    rows = summary["sizes"]
    targets = sorted({t for r in rows for m in r["methods"].values() for t in m["reach"]})
    lines = [
        "Clone test accuracy % at the largest budget (mean [95% interval], x the victim), and "
        "queries to reach each fraction of the victim's accuracy (median [95% interval]; "
        "baseline needs k x: the geometric mean over paired runs of the baseline's queries "
        "over the method's; '>= k x' or '<= k x' where runs that never reached the fraction "
        "count as the largest budget, which makes k a bound).",
        "",
    ]
    header = ["size", "d", "victim", "method", "accuracy at budget"]
    header += [f"queries to {t}x" for t in targets]
    table = []
    for r in rows:
        for method, m in r["methods"].items():
            acc = _interval(m["accuracy"], 100, 1)
            if m["ratio"] is not None:
                acc += f" ({m['ratio']:.2f}x) at {r['budget']:,}"
            cells = []
            for t in targets:
                reach = m["reach"].get(t, {})
                if "median" in reach:
                    cell = _interval(reach["median"], 1, 0) + saved_cell(reach, r["baseline"])
                elif "runs" in reach:
                    cell = f"reached in {reach['reached']}/{reach['runs']} runs"
                    cell += saved_cell(reach, r["baseline"])
                else:
                    cell = "-"
                cells.append(cell)
            victim = f"{100 * r['victim_accuracy']:.1f}%"
            table.append([r["size"], r["d"], victim, method, acc, *cells])
    lines += markdown_table(header, table)
    sources = ", ".join(r["source"] for r in rows)
    lines += ["", f"From {sources}."]
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """<stem>.json, .md and .png across sizes."""
    return common.write_outputs(summary, out, stem, markdown, [("", plot)])


# The paper's inputs (SVHN, CIFAR-10: 3 x 32 x 32), marked on the plot.
PAPER_D = 3 * 32 * 32
# Marker per kind of ratio (by its sign in query_efficiency.summary.SAVED_KINDS): exact, or a bound
# where some runs never reached the target.
_MARKERS = {"": "o", ">= ": "^", "<= ": "v"}


def saved_points(summary: dict[str, Any], method: str, target: str) -> list[tuple]:
    """(d, kind, estimate, low, high) for each size where the queries saved by `method` to
    `target` are known, exactly or as a bound (kind: a key of SAVED_KINDS)."""
    points = []
    for row in summary["sizes"]:
        reach = row["methods"].get(method, {}).get("reach", {}).get(target, {})
        for kind, _ in SAVED_KINDS:
            if kind in reach:
                ratio = reach[kind]
                points.append((row["d"], kind, ratio["estimate"], *interval_ends(ratio)))
    return points


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Queries saved by explanations against d (baseline's queries over the method's, to each
    target, log-log), one panel per target with a measured ratio, the paper's d marked."""
    rows = summary["sizes"]
    baseline = rows[0]["baseline"] if rows else "dfme"
    methods = sorted({m for r in rows for m in r["methods"]} - {baseline})
    targets = sorted({t for r in rows for m in r["methods"].values() for t in m["reach"]})
    by_target = {t: {m: saved_points(summary, m, t) for m in methods} for t in targets}
    panels = [t for t in targets if any(by_target[t].values())]
    fig, axes = plots.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    measured_ds = sorted({r["d"] for r in rows})
    for ax, target in zip(axes, panels):
        for i, method in enumerate(methods):
            points = by_target[target][method]
            if points:
                _draw_ratios(ax, points, method, f"C{i}")
        shown = [v for pts in by_target[target].values() for pt in pts for v in pt[3:]]
        _format_panel(ax, target, baseline, measured_ds, shown)
    if not panels:
        axes[0].text(0.5, 0.5, "no target reached by both a method and the baseline",
                     ha="center", transform=axes[0].transAxes)  # fmt: skip
    return plots.save(fig, path, dpi=120)


def _draw_ratios(ax: Any, points: list[tuple], method: str, color: str) -> None:
    """One method's ratios against d: a line, and each kind's estimates with intervals."""
    ax.plot([p[0] for p in points], [p[2] for p in points], color=color, lw=1)
    for kind, sign in SAVED_KINDS:
        chosen = [p for p in points if p[1] == kind]
        if not chosen:
            continue
        est = [p[2] for p in chosen]
        err = [[e - p[3] for e, p in zip(est, chosen)],
               [p[4] - e for e, p in zip(est, chosen)]]  # fmt: skip
        note = f" ({sign.strip()})" if sign else ""
        ax.errorbar([p[0] for p in chosen], est, yerr=err, marker=_MARKERS[sign],
                    ls="none", capsize=3, color=color, label=f"{method}{note}")  # fmt: skip


def _format_panel(
    ax: Any, target: str, baseline: str, measured_ds: list[int], shown: list[float]
) -> None:
    """A target's panel: log axes, the paper's d marked, ticks, labels and legend."""
    from matplotlib import ticker

    ds = measured_ds + [PAPER_D]
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axvline(PAPER_D, color="grey", ls="--", lw=1, label="paper's inputs, d = 3,072")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(ds) / 1.5, max(ds) * 1.5)
    # Ticks at the measured sizes (the paper's is the labelled line: at 3,072 its tick
    # would overprint 56x56's 3,136), and at powers of 2 of the ratio.
    ax.set_xticks(measured_ds)
    bottom, top = min(shown + [1.0]) / 1.3, max(shown + [1.0]) * 1.3
    ax.set_yticks([2.0**k for k in range(-8, 9) if bottom <= 2.0**k <= top])
    ax.set_ylim(bottom, top)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("input dimension d = C x H x W")
    ax.set_ylabel(f"{baseline}'s queries / method's, to {target}x the victim")
    ax.set_title(f"queries saved to {target}x (95% interval)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
