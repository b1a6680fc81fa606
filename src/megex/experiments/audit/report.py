"""The audit's report, written from its summary alone (the schema is the summary dict that
report.json holds): report.json, report.md and report.html with the plots embedded, the plots
also as PNG files in plots/."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...runs import save_figure_atomic, write_json_atomic, write_text_atomic
from ...tables import markdown_table
from ..common import log
from . import cells
from .content import Block, Code, Figure, Items, Table, Text, defence_plot_key, document
from .html import render_html

__all__ = [
    "PLOTS_MISSING",
    "markdown",
    "plot_curves",
    "plot_defenses",
    "strict_json",
    "write_report",
]

PLOTS_MISSING = "matplotlib is not installed (pip install 'megex[plots]')"

# Small plots: they sit beside tables on a page.
_FIGSIZE, _DPI = (6, 3.5), 110


def markdown(summary: dict[str, Any], images: Mapping[str, str] | None = None) -> str:
    """report.md: the answer first, then each threat model, the defences, the monitors, what was
    skipped, the caveats, the plan and the victim. `images` maps a plot's key (a threat model's
    key, or 'defenses') to its path relative to the report; plots not in it are left out."""
    lines: list[str] = []
    for section in document(summary):
        lines += [f"{'#' * section.level} {section.heading}", ""]
        for block in section.blocks:
            lines += _md_block(block, images or {})
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block: Block, images: Mapping[str, str]) -> list[str]:
    if isinstance(block, Text):
        return [f"**{block.label}**: {block.text}" if block.label else block.text, ""]
    if isinstance(block, Items):
        return [
            f"- **{label}**: {text}" if label else f"- {text}" for label, text in block.items
        ] + [""]
    if isinstance(block, Table):
        rows = [[_md_cell(cell) for cell in row] for row in block.rows]
        header = [_md_cell(cell) for cell in block.header]
        return markdown_table(header, rows, align=block.align) + [""]
    if isinstance(block, Code):
        return ["```", *block.lines, "```", ""]
    if isinstance(block, Figure) and block.key in images:
        return [f"![{block.alt}]({images[block.key]})", ""]
    return []


def _md_cell(text: str) -> str:
    # A pipe or a line break inside a cell would end it.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pyplot() -> Any:
    """matplotlib.pyplot on its file backend; ImportError where matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure_atomic(fig, path, dpi=_DPI)


def _float(value: Any) -> float:
    return math.nan if cells.is_missing(value) else float(value)


def plot_curves(threat_model: dict[str, Any], victim_accuracy: float | None, path: Path) -> Path:
    """Clone accuracy (%) against queries (log axis) for one threat model: one line per method
    with its interval as a band, the victim's accuracy and each target fraction of it dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    roles = {threat_model.get("baseline"): "predictions only", threat_model.get("attacker"): "maps"}
    for method, curve in (threat_model.get("curves") or {}).items():
        points = [p for p in curve if not cells.is_missing(p[0]) and p[0] > 0]  # log axis
        if not points:
            continue
        xs = [p[0] for p in points]
        est, low, high = ([100 * _float(p[i]) for p in points] for i in (1, 2, 3))
        label = f"{method} ({roles[method]})" if method in roles else method
        (line,) = ax.plot(xs, est, marker="o", markersize=3, label=label)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if not cells.is_missing(victim_accuracy):
        ax.axhline(100 * victim_accuracy, color="black", linestyle=":", lw=1, label="victim")
        for target in sorted({row["target"] for row in threat_model.get("leakage") or []}):
            y = 100 * target * victim_accuracy
            ax.axhline(y, color="grey", linestyle=":", lw=0.8)
            where = {"xycoords": ("axes fraction", "data"), "ha": "right", "va": "bottom"}
            ax.annotate(f"{target:.0%} of victim", (1, y), fontsize=7, color="grey", **where)
    ax.set_xscale("log")
    ax.set_xlabel("queries")
    ax.set_ylabel("clone accuracy (%)")
    ax.set_title(str(threat_model.get("title") or threat_model.get("key")), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, Path(path))


def plot_defenses(block: dict[str, Any], path: Path) -> Path:
    """A grouped bar chart of one threat model's defences (a block of the summary's
    "defenses"), one group per defence: the accuracy served to honest users and each
    attacker's clone accuracy (with its interval) under that defence."""
    plt = _pyplot()
    rows = block["rows"]
    names = list(dict.fromkeys(name for row in rows for name in row.get("attackers", {})))
    series = [("served to honest users", [{"estimate": r.get("served_accuracy")} for r in rows])]
    for name in names:
        accuracy = [((r.get("attackers") or {}).get(name) or {}).get("accuracy") for r in rows]
        series.append((f"{name} clone", accuracy))
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    width = 0.8 / len(series)
    for k, (label, intervals) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(rows))]
        est, err = _bars(intervals)
        # The served accuracy is one measurement (no interval): no error bar.
        ax.bar(xs, est, width, label=label, yerr=err if k else None, capsize=2)
    ax.set_xticks(range(len(rows)), [str(r.get("spec")) for r in rows], rotation=20, ha="right")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    title = f"Defences at {cells.queries(block.get('budget'))} queries"
    ax.set_title(f"{title} ({block.get('title') or block.get('threat_model')})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(path))


def _bars(intervals: list[Mapping[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    """Bar heights (%) and their error bars (below, above), 0 where an end is missing."""
    est, below, above = [], [], []
    for i in intervals:
        e = 100 * _float((i or {}).get("estimate"))
        low, high = 100 * _float((i or {}).get("low")), 100 * _float((i or {}).get("high"))
        est.append(0.0 if math.isnan(e) else e)
        below.append(0.0 if math.isnan(e) or math.isnan(low) else max(0.0, e - low))
        above.append(0.0 if math.isnan(e) or math.isnan(high) else max(0.0, high - e))
    return est, [below, above]


def strict_json(value: Any) -> Any:
    """A copy that json writes as strict JSON: NaN and infinities become None (null), numpy
    scalars plain numbers, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return strict_json(value.item())
    return value


def _plot_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip(".-") or "plot"


def _plots(summary: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Each plot's key -> its PNG in `folder`; ImportError without matplotlib."""
    accuracy = (summary.get("victim") or {}).get("accuracy")
    images = {}
    for tm in summary.get("threat_models") or []:
        if tm.get("curves"):
            path = folder / f"{_plot_name(tm['key'])}.png"
            images[tm["key"]] = plot_curves(tm, accuracy, path)
    for block in summary.get("defenses") or []:
        if block.get("rows"):
            key = defence_plot_key(str(block.get("threat_model")))
            images[key] = plot_defenses(block, folder / f"{_plot_name(key)}.png")
    return images


def write_report(summary: dict[str, Any], out: Path) -> list[Path]:
    """Write out/report.json (strict JSON: NaN is null), out/report.md, out/report.html (one
    self-contained file) and the plots as out/plots/<key>.png; each file atomically. Without
    matplotlib the plots are skipped, which the reports say. Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pngs = _plots(summary, out / "plots")
    except ImportError:
        log(f"report: plots skipped, {PLOTS_MISSING}")
        pngs = {}
        skipped = [*(summary.get("skipped") or []), {"part": "plots", "why": PLOTS_MISSING}]
        summary = {**summary, "skipped": skipped}
    strict = strict_json(summary)
    json_path, md_path, html_path = out / "report.json", out / "report.md", out / "report.html"
    write_json_atomic(json_path, strict)
    relative = {key: path.relative_to(out).as_posix() for key, path in pngs.items()}
    write_text_atomic(md_path, markdown(strict, relative))
    write_text_atomic(html_path, render_html(strict, {k: p.read_bytes() for k, p in pngs.items()}))
    return [json_path, md_path, html_path, *pngs.values()]
