"""The `megex` command: train-victim, attack, audit, eval, report, demo, serve, flags, settings,
defenses, utility, and the experiments (bench, tune, tradeoff, detection, art-peer,
input-size, gradient-alignment), which live in :mod:`megex.experiments`; only this package parses
arguments.

One `main`, one user-error type and one map of exit statuses (:mod:`megex.cli.errors`):
0 done, 1 refused or failed, 2 a mistake on the command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import (
    attack,
    audit,
    bench,
    defenses,
    demo,
    evaluate,
    records,
    serve,
    settings,
    sizes,
    studies,
    victim,
)
from .common import HelpFormatter
from .errors import INTERRUPTED, UsageError, exit_status

__all__ = ["UsageError", "build_parser", "main", "version"]


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("megex")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The `megex` command line and every subcommand."""
    parser = argparse.ArgumentParser(
        prog="megex",
        description="Measure how much a model gives away when it returns explanations: "
        "data-free model extraction with MEGEX and DFME.",
        epilog="Exit status: 0 done, 1 refused or failed (budget spent, service unreachable, "
        "missing file), 2 a mistake on the command line, 130 interrupted.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"megex {version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = {"formatter_class": HelpFormatter}
    victim.add_parser(sub, **fmt)
    attack.add_parser(sub, **fmt)
    audit.add_parser(sub, **fmt)
    evaluate.add_parsers(sub, **fmt)
    demo.add_parser(sub, **fmt)
    serve.add_parser(sub, **fmt)
    defenses.add_parsers(sub, **fmt)
    serve.add_flags_parser(sub, **fmt)
    settings.add_settings_parser(sub, **fmt)
    bench.add_parsers(sub, **fmt)
    studies.add_parsers(sub, **fmt)
    records.add_parsers(sub, **fmt)
    steps = sizes.Steps(check=lambda argv: build_parser().parse_args(argv), run=main)
    sizes.add_parsers(sub, steps, **fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command not in sizes.FORWARDS_UNKNOWN_OPTIONS:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.forwarded = unknown
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"megex {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        status = exit_status(exc)
        if status is None:
            raise  # a bug: its traceback
        print(f"megex {args.command}: error: {exc}", file=sys.stderr)
        return status
