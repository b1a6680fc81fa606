"""The table: per implementation and method, clone test accuracy at each budget (mean and sd
over seeds) and queries per second, as markdown and as the summary in the JSON."""

from __future__ import annotations

import statistics
from typing import Any

from megex.experiments.common import fmt_budget
from megex.tables import markdown_table

from .rows import NAMES, ROWS


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{mean:.1f}"


def summarise(rows: list[dict[str, Any]], budgets: list[int]) -> dict[str, Any]:
    """Per implementation and method: mean clone accuracy per budget and queries per second
    over the seeds that finished; the rows that did not run, with why."""
    table = []
    for peer, method, attack in ROWS:
        mine = [r for r in rows if r["peer"] == peer and r["method"] == method]
        if not mine:
            continue
        finished = [r for r in mine if r["status"] == "finished"]
        entry: dict[str, Any] = {
            "attack": attack,
            "implementation": NAMES[(peer, method)],
            "peer": peer,
            "method": method,
            "seeds": [r["seed"] for r in finished],
        }
        for b in budgets:
            accs = [
                e["clone_accuracy"]
                for r in finished
                for e in r["evaluations"]
                if e["budget"] == b and e.get("clone_accuracy") is not None
            ]
            entry[f"accuracy_{b}"] = statistics.fmean(accs) if accs else None
            entry[f"cell_{b}"] = _cell(accs)
        rates = [r["queries_per_s"] for r in finished]
        entry["queries_per_s"] = statistics.fmean(rates) if rates else None
        entry["not_run"] = sorted({r["reason"] for r in mine if r["status"] != "finished"})
        # The victims take [0, 1] images; a peer that sends others is shown as it sends them.
        ranges = [r["query_pixels"] for r in finished if r.get("query_pixels")]
        low = min((lo for lo, _ in ranges), default=0.0)
        high = max((hi for _, hi in ranges), default=1.0)
        entry["query_pixels_outside_unit"] = [low, high] if low < 0 or high > 1 else None
        table.append(entry)
    return {"budgets": budgets, "table": table}


def markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    budgets = summary["budgets"]
    lines = [
        f"# Data-free attacks beside public implementations ({header['dataset']})",
        "",
        f"Victim {header['victim']} (test accuracy {100 * header['victim_accuracy']:.1f}%), "
        f"students {header['clone_arch']} everywhere, schedule: {header['schedule']}, "
        f"{header['test_images']} test images, torch threads {header['threads']}. Clone test "
        "accuracy (%, mean ± sd over seeds) at each budget of one run per seed; queries per "
        "second of the attack (victim included, evaluations excluded), counted by the "
        "harness's victim wrapper.",
        "",
    ]
    head = [
        "attack",
        "implementation",
        *[f"acc @ {fmt_budget(b)}" for b in budgets],
        "queries/s",
        "seeds",
    ]
    body = []
    notes = []
    for e in summary["table"]:
        rate = "-" if e["queries_per_s"] is None else f"{e['queries_per_s']:,.0f}"
        seeds = ", ".join(map(str, e["seeds"])) or "-"
        body.append(
            [e["attack"], e["implementation"], *[e[f"cell_{b}"] for b in budgets], rate, seeds]
        )
        notes += [f"- {e['implementation']}: not run: {reason}" for reason in e["not_run"]]
        if e["query_pixels_outside_unit"]:
            low, high = e["query_pixels_outside_unit"]
            notes.append(
                f"- {e['implementation']}: sent the victim pixels from {low:.2f} to {high:.2f} "
                "(the victim's images are in [0, 1]), as its code sends them"
            )
    lines += markdown_table(head, body)
    if header.get("peers_not_given"):
        notes.append(f"- not given: {header['peers_not_given']}")
    if notes:
        lines += ["", *notes]
    commits = header.get("commits") or {}
    if commits:
        lines += ["", "Peer checkouts: " + "; ".join(f"{k} {v}" for k, v in commits.items())]
    return "\n".join(lines) + "\n"
