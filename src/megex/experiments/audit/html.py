"""report.html: the audit's report as one self-contained HTML5 page. The CSS is inline, each plot
is a data URI, there is no script, and nothing is loaded from anywhere: the file can be mailed,
archived or printed as it is. Its content is the markdown report's (content.document)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape
from typing import Any

from .content import Block, Code, Figure, Items, Section, Table, Text, document

__all__ = ["render_html"]

# Local font stacks only (no web font is fetched); tables bordered; a readable measure on
# screen and the full page width on paper.
_CSS = """
body { margin: 0; background: #fff; color: #1a1a1a; line-height: 1.5; font-size: 16px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 64rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.8rem; margin: 0 0 0.5rem; }
h2 { font-size: 1.35rem; margin: 2rem 0 0.5rem; padding-bottom: 0.2rem;
  border-bottom: 1px solid #bbb; }
h3 { font-size: 1.1rem; margin: 1.5rem 0 0.5rem; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem;
  font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #999; padding: 0.25rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: #eee; }
td.r, th.r { text-align: right; }
tbody tr:nth-child(even) { background: #f7f7f7; }
pre { background: #f4f4f4; border: 1px solid #ddd; padding: 0.5rem; white-space: pre-wrap;
  overflow-wrap: anywhere; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 0.85rem; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
@media print {
  body { font-size: 10pt; }
  table { font-size: 8pt; }
  main { max-width: none; padding: 0; }
  h2, h3 { break-after: avoid; }
  table, figure { break-inside: avoid; }
  .table { overflow: visible; }
  th, tbody tr:nth-child(even) { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def render_html(summary: dict[str, Any], images: Mapping[str, bytes]) -> str:
    """The report as an HTML5 page; `images` maps a plot's key (a threat model's key, or
    'defenses-<threat model>') to its PNG bytes, embedded where the plot belongs. Every
    string from the summary is escaped."""
    sections = document(summary)
    body = "\n".join(_section(section, images) for section in sections)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(sections[0].heading)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
    # Characters past ASCII as references: the page reads the same whatever encoding the
    # file is written or opened with.
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _section(section: Section, images: Mapping[str, bytes]) -> str:
    level = min(max(section.level, 1), 6)
    parts = [f"<h{level}>{_e(section.heading)}</h{level}>"]
    parts += [_block(block, images) for block in section.blocks]
    return "\n".join(part for part in parts if part)


def _block(block: Block, images: Mapping[str, bytes]) -> str:
    if isinstance(block, Text):
        return f"<p>{_labelled(block.label, block.text)}</p>"
    if isinstance(block, Items):
        items = "".join(f"<li>{_labelled(label, text)}</li>" for label, text in block.items)
        return f"<ul>{items}</ul>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Code):
        return f"<pre><code>{_e(chr(10).join(block.lines))}</code></pre>"
    if isinstance(block, Figure) and block.key in images:
        return _figure(block, images[block.key])
    return ""


def _labelled(label: str, text: str) -> str:
    return f"<strong>{_e(label)}</strong>: {_e(text)}" if label else _e(text)


def _table(table: Table) -> str:
    classes = [' class="r"' if a == "right" else "" for a in table.align]
    classes += [""] * (len(table.header) - len(classes))
    head = "".join(f'<th scope="col"{c}>{_e(h)}</th>' for h, c in zip(table.header, classes))
    rows = "".join(
        "<tr>" + "".join(f"<td{c}>{_cell(cell, c)}</td>" for cell, c in zip(row, classes)) + "</tr>"
        for row in table.rows
    )
    return (
        f'<div class="table"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _cell(text: str, css_class: str) -> str:
    # A figure's interval breaks onto its own line as a whole ("71.2" / "[70.0, 72.4]"), never
    # inside its brackets.
    return _e(text).replace(", ", ",&nbsp;") if css_class else _e(text)


def _figure(figure: Figure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure.alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.alt)}</figcaption></figure>"
    )
