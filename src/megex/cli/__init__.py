"""The `megex` command: train-victim, attack, eval, report, demo, serve, flags, bench,
tune, tradeoff, detection, defenses and utility.

One `main`, one user-error type and one map of exit statuses (:mod:`megex.cli.errors`):
0 done, 1 refused or failed, 2 a mistake on the command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import settings
from .common import HelpFormatter
from .errors import INTERRUPTED, UsageError, exit_status, user_input

__all__ = ["UsageError", "build_parser", "main", "version"]


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("megex")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from . import attack, defenses, demo, evaluate, serve, victim

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
    evaluate.add_parsers(sub, **fmt)
    demo.add_parser(sub, **fmt)
    serve.add_parser(sub, **fmt)
    defenses.add_parsers(sub, **fmt)
    serve.add_flags_parser(sub, **fmt)
    settings.add_settings_parser(sub, **fmt)
    _add_bench(sub, **fmt)
    _add_tune(sub, **fmt)
    _add_tradeoff(sub, **fmt)
    _add_detection(sub, **fmt)
    return parser


def _add_tradeoff(sub: Any, **kwargs: Any) -> None:
    from .. import tradeoff

    p = sub.add_parser(
        "tradeoff",
        help="defences: explanation utility against the clone accuracy they leave",
        **kwargs,
    )
    tradeoff.add_arguments(p)
    p.set_defaults(func=lambda args: _run_tool(tradeoff.run_tradeoff, args))


def _add_detection(sub: Any, **kwargs: Any) -> None:
    from .. import detection_bench

    p = sub.add_parser(
        "detection",
        help="detection benchmark: do query monitors flag the attacks, and benign keys?",
        description="Record the query streams of attacks and of benign clients against a "
        "victim, calibrate each query monitor's threshold on validation streams for a target "
        "false-positive rate, and report detection rates, queries until detection and false "
        "positives on test streams (JSON and markdown), with a calibration file per monitor "
        "for megex serve --monitor NAME:calibration=FILE.",
        **kwargs,
    )
    detection_bench.add_arguments(p)
    p.set_defaults(func=lambda args: _run_tool(detection_bench.run_detection, args))


def _add_tune(sub: Any, **kwargs: Any) -> None:
    from .. import tune

    p = sub.add_parser(
        "tune", help="the tuning search behind the benchmark's settings (Optuna)", **kwargs
    )
    tune.add_arguments(p)
    p.set_defaults(func=lambda args: _run_tool(tune.run_search, args))


def _add_bench(sub: Any, **kwargs: Any) -> None:
    from .. import bench

    p = sub.add_parser("bench", help="query-efficiency benchmark: MEGEX vs DFME", **kwargs)
    bench.add_arguments(p)
    p.set_defaults(func=lambda args: _run_tool(bench.run_benchmark, args))


def _run_tool(function: Any, args: argparse.Namespace) -> int:
    # The benchmark's and the search's ValueErrors are about their settings (the --config
    # file, a run folder holding other settings), which they check as they plan their runs.
    with user_input():
        function(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
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
