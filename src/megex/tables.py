"""Markdown tables: the one way every report and experiment writes one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table"]

# The rule cell for each column alignment ("" leaves it to the renderer: left).
_RULES = {"": "---", "left": ":---", "right": "---:", "center": ":---:"}


def markdown_table(
    header: Sequence[Any],
    rows: Iterable[Sequence[Any]] = (),
    *,
    align: Sequence[str] = (),
    tight_rule: bool = False,
) -> list[str]:
    """The lines of a markdown table: the header, its rule, then one line per row.

    Cells are written with ``str``: ``| a | b |``, then ``| --- | --- |``, then the rows.
    `align` gives columns an alignment, in order ("", "left", "right" or "center"; columns
    past its end are left as they are: ``---``); `tight_rule` writes the rule without
    spaces (``|---|---|``). A row must have as many cells as the header; a table without
    rows is its header and rule.
    """
    width = len(header)
    if not width:
        raise ValueError("markdown table: no columns")
    if len(align) > width or any(a not in _RULES for a in align):
        raise ValueError(f"markdown table: bad alignment {list(align)} for {width} columns")
    rules = [_RULES[a] for a in align] + [_RULES[""]] * (width - len(align))
    pad = "" if tight_rule else " "
    lines = [_line(header), "|" + "".join(f"{pad}{rule}{pad}|" for rule in rules)]
    for row in rows:
        if len(row) != width:
            raise ValueError(f"markdown table: a row of {len(row)} cells under {width} columns")
        lines.append(_line(row))
    return lines


def _line(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
