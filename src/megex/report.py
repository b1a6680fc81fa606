"""Tables and plots from run folders (markdown table; accuracy-vs-queries PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import plots, tables
from .runs import RunFolder, write_json_atomic, write_text_atomic

__all__ = ["load_run", "markdown_table", "plot_accuracy", "summary", "write_report"]


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """Config, metrics and result of one run folder (result may be missing if unfinished)."""
    folder = RunFolder(path)
    if not folder.config_path.is_file():
        raise FileNotFoundError(f"run folder: {folder.path} has no config.json (not a run folder)")
    config = folder.read_config()
    result = folder.read_result() if folder.is_finished() else {}
    return {
        "path": str(folder.path),
        "label": config.get("label") or folder.path.name,
        "config": config,
        "metrics": folder.read_metrics(),
        "result": result,
        "finished": bool(result),
    }


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def summary(
    runs: list[dict[str, Any]], victim_accuracy: float | None = None
) -> list[dict[str, Any]]:
    """One plain record per run (what report.json holds and the table shows).

    Each run's ratio is against its own victim (from its config), so runs of different
    victims can share a report; `victim_accuracy` stands in for runs that record none.
    """
    rows = []
    for run in runs:
        last = run["metrics"][-1] if run["metrics"] else {}
        result, config = run["result"], run["config"]
        acc = result.get("clone_accuracy", last.get("clone_accuracy"))
        victim = config.get("victim_accuracy") or victim_accuracy
        rows.append(
            {
                "label": run["label"],
                "path": run["path"],
                "method": config.get("method"),
                "finished": run["finished"],
                "victim_accuracy": victim,
                "clone_accuracy": acc,
                "ratio": acc / victim if (acc is not None and victim) else None,
                "fidelity": result.get("fidelity", last.get("fidelity")),
                "queries": result.get("queries_used", last.get("queries")),
                "elapsed_s": result.get("elapsed_s", last.get("elapsed_s")),
                "details": result.get("details", {}),
                "curve": [
                    {k: m.get(k) for k in ("queries", "clone_accuracy", "fidelity")}
                    for m in run["metrics"]
                ],
            }
        )
    return rows


_COLUMNS = (
    "run", "method", "explanation", "clone accuracy", "x victim", "fidelity", "queries", "seconds",
)  # fmt: skip


def markdown_table(runs: list[dict[str, Any]], victim_accuracy: float | None = None) -> str:
    """One row per run: clone accuracy, ratio to the victim, fidelity, queries, seconds."""
    lines = []
    if victim_accuracy is not None:
        lines += [f"Victim accuracy: {100 * victim_accuracy:.1f}%", ""]
    rows = []
    for row in summary(runs, victim_accuracy):
        explanation = (row["details"] or {}).get("explanation")
        expl = (
            f"{explanation['method']}/{explanation['target']}"
            if isinstance(explanation, dict)
            else ("none (zeroth-order)" if row["method"] == "dfme" else "-")
        )
        status = "" if row["finished"] else " (unfinished)"
        rows.append(
            [
                f"{row['label']}{status}",
                _fmt(row["method"]),
                expl,
                _fmt(row["clone_accuracy"], True),
                _fmt(row["ratio"]),
                _fmt(row["fidelity"], True),
                _fmt(row["queries"]),
                _fmt(row["elapsed_s"]),
            ]
        )
    lines += tables.markdown_table(_COLUMNS, rows)
    return "\n".join(lines) + "\n"


def plot_accuracy(
    runs: list[dict[str, Any]], path: str | os.PathLike, victim_accuracy: float | None = None
) -> Path | None:
    """Clone accuracy vs. queries, one line per run; None if matplotlib is missing."""
    try:
        fig, ax = plots.subplots(figsize=(6, 4), dpi=120)
    except ImportError:
        return None
    for run in runs:
        xs = [m["queries"] for m in run["metrics"]]
        ys = [100 * m["clone_accuracy"] for m in run["metrics"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=run["label"])
    if victim_accuracy is not None:
        ax.axhline(100 * victim_accuracy, color="grey", linestyle="--", label="victim")
    ax.set_xlabel("queries")
    ax.set_ylabel("clone test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save(fig, path)


def write_report(
    run_paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    victim_accuracy: float | None = None,
) -> tuple[Path, Path | None, str]:
    """Write report.md, report.json and accuracy.png for run folders.

    Returns (markdown path, plot path or None without matplotlib, the table).
    """
    runs = [load_run(p) for p in run_paths]
    if victim_accuracy is None:
        for run in runs:
            victim_accuracy = run["config"].get("victim_accuracy") or victim_accuracy
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs, victim_accuracy)
    md = out / "report.md"
    png = plot_accuracy(runs, out / "accuracy.png", victim_accuracy)
    body = "# megex report\n\n" + table
    if png is not None:
        body += f"\n![clone accuracy vs queries]({png.name})\n"
    write_text_atomic(md, body)
    report = {"victim_accuracy": victim_accuracy, "runs": summary(runs, victim_accuracy)}
    write_json_atomic(out / "report.json", report)
    return md, png, table
