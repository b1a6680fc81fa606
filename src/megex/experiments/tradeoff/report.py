"""The trade-off's markdown table and plot, formatted from its summary alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ... import plots
from ...tables import markdown_table
from .. import common
from ..common import fmt_budget
from .rows import ADAPTIVE
from .summary import counted_variant

__all__ = ["markdown", "plot_tradeoff", "plotted_points", "write_outputs"]


def _pct(i: dict[str, float]) -> str:
    if not i or math.isnan(i.get("estimate", math.nan)):
        return "-"
    if math.isnan(i["low"]):
        return f"{100 * i['estimate']:.1f}"
    return f"{100 * i['estimate']:.1f} [{100 * i['low']:.1f}, {100 * i['high']:.1f}]"


def _points(d: dict[str, Any]) -> str:
    """A paired difference in points: mean [bootstrap] (t: [...]), or '-'."""
    if not d or d.get("pairs", 0) == 0:
        return "-"
    if d["pairs"] == 1:
        return f"{100 * d['mean']:+.1f}"
    text = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    if math.isnan(d.get("t_low", math.nan)):
        return text
    return text + f" (t: [{100 * d['t_low']:+.1f}, {100 * d['t_high']:+.1f}])"


def markdown(summary: dict[str, Any]) -> str:
    """The trade-off as markdown: the protocol, the clone accuracy per defence and attacker,
    what each defence took from each attacker, and what the tables say."""
    lines = [
        *_introduction(summary),
        *_accuracy_table(summary),
        *_taken_table(summary),
        *_verdicts(summary),
    ]
    return "\n".join(lines) + "\n"


def _introduction(summary: dict[str, Any]) -> list[str]:
    """The title, the victims and runs, what utility means, and the attack settings."""
    b = fmt_budget(summary["budget"])
    victims = ", ".join(f"{100 * a:.2f}%" for a in summary["victims"].values())
    lines = [
        f"# Defences: explanation utility against clone accuracy at {b} queries",
        "",
        f"Victims (test accuracy): {victims}; attack seeds {summary['seeds']}; "
        f"{summary['runs']} runs, {summary['wall_s']:.0f} s wall time. Clone accuracy in %, "
        "mean [95% hierarchical bootstrap interval]. Utility: the predicted class's map of "
        "the defended service against the undefended one on test images (cosine, Spearman; "
        "`l1`: L1 distance moved in the probabilities; `labels`: share of top-1 labels "
        "kept).",
        "",
    ]
    if summary.get("tuned_settings") is None:
        lines += [
            "Attack settings: untuned (the package defaults and the benchmark's shared "
            "settings), not the search's.",
            "",
        ]
    else:
        lines += [f"Attack settings: the search's, from {summary['tuned_settings']}.", ""]
    return lines


def _accuracy_table(summary: dict[str, Any]) -> list[str]:
    """Per defence: its utility, and each attacker's clone accuracy (naive and adaptive)."""
    attackers = summary["attackers"]
    labels = [m for a in attackers for m in (a, a + ADAPTIVE)]
    head = ["defence", "cosine", "spearman", "l1", "labels", *labels, summary["baseline"]]
    table = []
    for row in summary["rows"]:
        u = row["utility"]
        cells = [
            row["defense"],
            f"{u.get('cosine', math.nan):.3f}",
            f"{u.get('spearman', math.nan):.3f}",
            f"{u.get('probability_l1', math.nan):.3f}",
            f"{u.get('label_kept', math.nan):.3f}",
        ]
        for label in labels:
            m = row["methods"].get(label)
            if m is None or "accuracy" not in m:
                cells.append("= naive" if label.endswith(ADAPTIVE) else "-")
                continue
            mark = ""
            if m.get("counted"):
                leads = label.removesuffix(ADAPTIVE) in summary.get("leading_attackers", [])
                mark = " (counted, stopped)" if leads and m.get("stopped") else " (counted)"
            cells.append(_pct(m["accuracy"]) + mark)
        cells.append(_pct(row["methods"].get(summary["baseline"], {}).get("accuracy", {})))
        table.append(cells)
    return markdown_table(head, table, tight_rule=True)


def _taken_table(summary: dict[str, Any]) -> list[str]:
    """Per defence and attacker: the counted variant's accuracy minus the undefended runs'."""
    attackers = summary["attackers"]
    lines = [
        "",
        "What each defence took from each attacker: the counted variant's clone accuracy "
        "minus the same attacker's undefended runs (same victim, same seed), points, "
        "mean [95% bootstrap interval] (t: Student t interval over the victims):",
        "",
    ]
    table = []
    for row in summary["rows"]:
        if not row["specs"]:
            continue
        cells = [row["defense"]]
        for attacker in attackers:
            counted = counted_variant(row, attacker) or {}
            cells.append(_points(counted.get("minus_undefended", {})))
        table.append(cells)
    return [*lines, *markdown_table(["defence", *attackers], table, tight_rule=True)]


def _verdicts(summary: dict[str, Any]) -> list[str]:
    """The verdicts: each attacker's lead without a defence, then the effective defences."""
    lines = ["", "## What the table says", ""]
    lead = summary["undefended_lead"]
    for attacker, verdict in lead.items():
        if verdict == "too few runs":
            lines.append(
                f"- One pair of runs per method: no interval, so no verdict on whether "
                f"{attacker} is ahead of {summary['baseline']}, or on what a defence stops."
            )
        elif verdict == "a ahead":
            lines.append(f"- Without a defence, {attacker} is ahead of {summary['baseline']}.")
        else:
            lines.append(
                f"- Without a defence, {attacker} is not measurably ahead of "
                f"{summary['baseline']} ({verdict or 'too few runs'}): there is no lead for "
                "a defence to remove, and 'stopped' says only that none appeared."
            )
    threshold = summary["utility_threshold"]
    if not summary.get("leading_attackers", []):
        lines.append(
            "- No explanation attacker was measurably ahead without a defence: no defence "
            "had a lead to stop, so none is named as effective; the tables give what each "
            "costs in utility and takes from the attackers."
        )
    elif summary["effective"]:
        lines.append(
            f"- Defences that leave no explanation attacker that led (neither naive nor adaptive) "
            f"measurably ahead of {summary['baseline']} while keeping the maps' cosine to "
            f"the undefended ones at {threshold:g} or more: "
            + ", ".join(_named_defense(summary, d) for d in summary["effective"])
            + "."
        )
    else:
        lines.append(
            f"- No defence both left the explanation attackers without a measured lead over "
            f"{summary['baseline']} and kept the maps' cosine at {threshold:g} or more."
        )
    return lines


def _named_defense(summary: dict[str, Any], name: str) -> str:
    """A defence the report names, with what it costs the answers' probabilities when it
    works on them: the utility bar reads the maps only, so that cost is said beside it."""
    row = next(r for r in summary["rows"] if r["defense"] == name)
    utility = row["utility"]
    moved = utility.get("probability_l1", 0.0)
    if not moved:
        return f"`{name}`"
    return (
        f"`{name}` (on the predictions: probabilities moved by L1 {moved:.3f} "
        f"on average, top-1 label kept on {utility.get('label_kept', math.nan):.1%} of images)"
    )


def write_outputs(summary: dict[str, Any], out: Path, stem: str, plot: bool = True) -> list[Path]:
    """<stem>.json, .md and (with `plot`) .png."""
    return common.write_outputs(summary, out, stem, markdown, [("", plot_tradeoff)] if plot else [])


def plotted_points(summary: dict[str, Any], attacker: str) -> dict[str, list[tuple]]:
    """Per defence family, the (cosine utility, clone accuracy %) points of one attacker in
    the variant the table counts for each row (the stronger of naive and adaptive)."""
    families: dict[str, list[tuple[float, float]]] = {}
    for row in summary["rows"]:
        m = counted_variant(row, attacker)
        cos = row["utility"].get("cosine")
        if m is None or cos is None:
            continue
        family = row["defense"].split(":")[0] if row["specs"] else "none"
        families.setdefault(family, []).append((cos, 100 * m["accuracy"]["estimate"]))
    return families


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """One panel per explanation attacker (the counted variant): one curve per defence
    family, utility (cosine) across, clone accuracy up; the baseline as a band."""
    attackers = summary["attackers"]
    fig, axes = plots.subplots(
        1, len(attackers), figsize=(5.5 * len(attackers), 4.2), squeeze=False
    )
    base_row = next((r for r in summary["rows"] if r["defense"] == "none"), None)
    for ax, attacker in zip(axes[0], attackers):
        families = plotted_points(summary, attacker)
        for family, points in sorted(families.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=family)
        if base_row is not None and summary["baseline"] in base_row["methods"]:
            acc = base_row["methods"][summary["baseline"]]["accuracy"]
            ax.axhline(100 * acc["estimate"], color="k", ls="--", lw=1, label=summary["baseline"])
            if not math.isnan(acc["low"]):
                ax.axhspan(100 * acc["low"], 100 * acc["high"], color="k", alpha=0.08)
        ax.axvline(summary["utility_threshold"], color="grey", ls=":", lw=1)
        ax.set_xlabel("explanation utility (cosine to the undefended map)")
        ax.set_ylabel(f"clone accuracy at {summary['budget']:,} queries (%)")
        ax.set_title(f"{attacker} (the variant counted: naive or adaptive)")
        ax.legend(fontsize=7)
    return plots.save(fig, path, dpi=120)
