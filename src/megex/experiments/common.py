"""The kit every experiment shares: logging, budgets in words, and writing the outputs
(JSON, markdown, PNG) atomically (markdown tables: :func:`megex.tables.markdown_table`).

An experiment is plan -> sweep -> summarise -> write: it plans jobs from its config (a JSON
file over its declared keys, read by :func:`megex.experiments.config.load`), runs them with
:func:`megex.experiments.sweep.run_jobs`, summarises the finished runs into one JSON-able
dict, and writes that dict with :func:`write_outputs` (the markdown and plots are rebuilt from
the summary alone, so a table can always be rewritten from its JSON).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..runs import write_json_atomic, write_text_atomic

__all__ = [
    "fmt_budget",
    "log",
    "write_outputs",
]


def log(message: str) -> None:
    """Progress and findings go to stderr (stdout stays free for machine-read output)."""
    print(message, file=sys.stderr, flush=True)


def fmt_budget(queries: int) -> str:
    """A query budget in words: 1000 -> '1k', 2_500_000 -> '2.5M'."""
    if queries >= 1_000_000 and queries % 100_000 == 0:
        return f"{queries / 1_000_000:g}M"
    return f"{queries / 1000:g}k" if queries >= 1000 else str(queries)


def write_outputs(
    summary: dict[str, Any],
    out: Path,
    stem: str,
    markdown: Callable[[dict[str, Any]], str],
    plots: Sequence[tuple[str, Callable[[dict[str, Any], Path], Path]]] = (),
) -> list[Path]:
    """<out>/<stem>.json and .md, then each plot (suffix, function) as <out>/<stem><suffix>.png;
    a plot is skipped, with a note, when matplotlib is not installed."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json_atomic(json_path, summary)
    write_text_atomic(md_path, markdown(summary))
    paths = [json_path, md_path]
    for suffix, plot in plots:
        try:
            paths.append(plot(summary, out / f"{stem}{suffix}.png"))
        except ImportError:
            log("plot: matplotlib is not installed (pip install 'megex[plots]'); PNG skipped")
            break
    return paths
