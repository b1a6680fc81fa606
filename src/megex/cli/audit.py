"""`megex audit`: what a provider's own model gives away when it explains itself, and what
helps (megex.experiments.audit), in one command that ends in a report."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .. import data as data_mod
from ..experiments.audit import DEFAULT_DEFENSES, AuditOptions, run_audit
from ..experiments.audit.threats import DATA_FREE_ATTACKER, DEFAULT_BUDGET, DEFAULT_BUDGETS
from .attack import add_service_options, check_service_options
from .common import positive_int
from .defenses import DEFENSE_HELP
from .errors import UsageError, user_input

__all__ = ["add_parser", "duration"]

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def duration(text: str) -> float:
    """An argparse type: a duration such as 90s, 30m, 1.5h or 600 (seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive duration such as 90s, 30m or 1.5h, got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def add_parser(sub: Any, **kwargs: Any) -> None:
    budgets = ", ".join(f"{d} {b}" for d, b in DEFAULT_BUDGETS.items())
    p = sub.add_parser(
        "audit",
        help="measure what your model gives away through its explanations, and what helps: "
        "one command, one report",
        description="Attack your own model (a victim file or a served URL) as the benchmark "
        "does, on a compact plan: the predictions-only attacker against the map attacker, "
        "data-free and (with --pool) with the attacker's images, at a few budgets and seeds; "
        "then each defence, with its cost to honest users. Writes report.html, report.md and "
        "report.json to --out. Rerun the same command to resume an interrupted audit.",
        **kwargs,
    )
    p.add_argument("--victim", required=True, help="victim .safetensors file, or a server URL")
    p.add_argument("--out", required=True, help="folder of the audit's runs and report")
    p.add_argument("--api-key", help="API key for a victim served over HTTP")
    add_service_options(p.add_argument_group("a victim served over HTTP"))
    p.add_argument(
        "--dataset",
        choices=data_mod.DATASETS,
        help="test set the clones (and a served victim) are measured on (default: a victim "
        "file's own; required with a URL)",
    )
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument(
        "--pool",
        metavar="SPEC",
        help="also audit the attacker who holds these images (megex attack --pool's specs, "
        "e.g. fashion-mnist:unseen:1000 or folder:PATH)",
    )
    p.add_argument(
        "--explanation",
        choices=sorted(DATA_FREE_ATTACKER),
        default="gradient",
        help="the explanation your service returns (default: gradient)",
    )
    p.add_argument(
        "--budget",
        type=positive_int,
        help="largest data-free budget in queries; a tenth, a quarter and a half of it are "
        f"measured too (default: {budgets}, else {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--pool-budget",
        type=positive_int,
        default=1000,
        help="largest budget of the attacker with images (default: 1000)",
    )
    p.add_argument(
        "--seeds", type=positive_int, default=3, help="attack seeds per method (default: 3)"
    )
    p.add_argument(
        "--defense",
        action="append",
        metavar="SPEC",
        help=f"a defence to measure (repeatable; default: {', '.join(DEFAULT_DEFENSES)}). "
        f"{DEFENSE_HELP}",
    )
    p.add_argument(
        "--search",
        type=positive_int,
        metavar="TRIALS",
        help="search both attackers' settings on this victim first (TRIALS per method and "
        "one of its published settings, scored on the validation images it held out; "
        "megex train-victim --validation-images), instead of the shipped settings",
    )
    p.add_argument("--no-defenses", action="store_true", help="measure no defence")
    p.add_argument("--no-monitors", action="store_true", help="run no query monitor")
    p.add_argument(
        "--time-limit",
        type=duration,
        metavar="DURATION",
        help="fit the plan to this wall time (e.g. 30m): defences, seeds and the largest "
        "budgets are dropped first, as the report says",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="runs at once, each in its own process (default: 2, or 1 on one CPU)",
    )
    p.add_argument("--fresh", action="store_true", help="start over, discarding --out's audit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    if args.no_defenses and args.defense:
        raise UsageError("--no-defenses: given with --defense; choose one")
    check_service_options(args)
    options = AuditOptions(
        victim=args.victim,
        out=Path(args.out),
        api_key=args.api_key,
        protocol=args.protocol,
        encoding=args.encoding,
        dataset=args.dataset,
        data_root=args.data_root,
        pool=args.pool,
        explanation=args.explanation,
        budget=args.budget,
        pool_budget=args.pool_budget,
        seeds=args.seeds,
        defenses=() if args.no_defenses else tuple(args.defense or DEFAULT_DEFENSES),
        time_limit_s=args.time_limit,
        jobs=args.jobs,
        fresh=args.fresh,
        progress=not args.quiet,
        monitors=not args.no_monitors,
        search_trials=args.search or 0,
        command=_command(args),
    )
    with user_input():
        summary = run_audit(options)
    print(Path(summary["out"]) / "report.html")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces the audit (its API key left out)."""
    argv = list(sys.argv[1:]) if sys.argv[1:2] == ["audit"] else ["audit"]
    if "--api-key" in argv:
        i = argv.index("--api-key")
        argv[i + 1 : i + 2] = ["KEY"]
    return shlex.join(["megex", *argv])
