"""`megex flags`: the keys that a service's query monitors flagged, read from its ledger."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..ledger_file import flag_report
from .common import add_json_option, print_json
from .errors import user_input

__all__ = ["DEFAULT_DB", "add_flags_parser", "run_flags"]

# The ledger `megex serve` keeps unless told otherwise.
DEFAULT_DB = "megex-ledger.sqlite"


def add_flags_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "flags",
        help="the keys that a service's query monitors flagged (from its ledger)",
        description="List the keys that the query monitors of `megex serve --monitor ...` "
        "flagged, with each key's first flag (when, which monitor, its statistic and "
        "threshold, after how many of the key's queries) and its number of flags. Reads the "
        "ledger without locking it, so it works while the server runs. Keys are shown by "
        "their ledger label (key- and the start of the key's salted hash).",
        **kwargs,
    )
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help="the service's SQLite ledger")
    add_json_option(p)
    p.set_defaults(func=run_flags)


def run_flags(args: argparse.Namespace) -> int:
    """Handler of ``flags``: the flagged keys, as a table or one JSON document."""
    with user_input("--db"):
        report = flag_report(args.db)
    if args.json:
        print_json(report)
        return 0
    flagged = report["flagged"]
    print(f"ledger {report['ledger']}: {len(flagged)} of {report['accounts']} key(s) flagged")
    if not flagged:
        return 0
    header = (
        "key", "flags", "first flag (UTC)", "monitor", "statistic", "threshold",
        "after queries", "queries used", "flags by monitor",
    )  # fmt: skip
    rows = [header]
    for entry in flagged:
        first = entry["first"]
        rows.append(
            (
                entry["label"] + ("" if entry["active"] else " (inactive)"),
                str(entry["flags"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(first["time"])),
                first["monitor"],
                f"{first['statistic']:.4f}",
                f"{first['threshold']:.4f}",
                str(first["queries_seen"]),
                str(entry["queries_used"]),
                ", ".join(f"{k} {v}" for k, v in sorted(entry["by_monitor"].items())),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
