"""`megex tradeoff` and `megex detection`: what defences cost and take, and whether query
monitors flag the attacks (megex.experiments.tradeoff and megex.experiments.detection)."""

from __future__ import annotations

import argparse
from typing import Any

from ..experiments import detection, tradeoff
from .bench import run_tool
from .sweep_options import add_sweep_arguments

__all__ = ["add_detection_arguments", "add_parsers", "add_tradeoff_arguments"]


def add_parsers(sub: Any, **kwargs: Any) -> None:
    """The `tradeoff` and `detection` subcommands."""
    p = sub.add_parser(
        "tradeoff",
        help="defences: explanation utility against the clone accuracy they leave",
        **kwargs,
    )
    add_tradeoff_arguments(p)
    p.set_defaults(func=lambda args: run_tool(tradeoff.run_tradeoff, args))
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
    add_detection_arguments(p)
    p.set_defaults(func=lambda args: run_tool(detection.run_detection, args))


def add_tradeoff_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="JSON file of trade-off settings (keys of DEFAULTS)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the reduced grid: one victim, one seed, one budget, three defences",
    )
    parser.add_argument(
        "--defense",
        action="append",
        metavar="SPECS",
        help="a defence row, comma-free specs joined by '+' (e.g. 'noise:0.5' or "
        "'round:2+sign'); repeatable; replaces the config's rows (the undefended row is "
        "always kept)",
    )
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json; default: the config's "
        "tuned_settings); 'none': the package defaults, untuned, said so in the report",
    )
    parser.add_argument("--budgets", type=int, nargs="+", help="query budgets to report")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument(
        "--out",
        default="benchmarks/results/tradeoff",
        help="output folder (default: benchmarks/results/tradeoff)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs; start over")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_sweep_arguments(parser, "runs")
    return parser


def add_detection_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (the `megex detection` subcommand)."""
    parser.add_argument(
        "--config",
        help="JSON file of benchmark settings (the keys of megex.experiments.detection.DEFAULTS)",
    )
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one victim, two seeds, shorter streams, fewer benign streams (minutes)",
    )
    parser.add_argument("--queries", type=int, help="queries per stream (attack and benign)")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument("--methods", nargs="+", help="attack methods (megex bench's names)")
    parser.add_argument("--streams", type=int, help="calibration and test streams per kind")
    parser.add_argument("--target-fpr", type=float, help="target false-positive rate per key")
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json); it must hold every method "
        "(default: the config's tuned_settings; none: the package defaults)",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/detection",
        help="output folder: tables and calibration files",
    )
    parser.add_argument(
        "--victims",
        default="benchmarks/results/victims",
        help="folder of cached victims (shared with megex bench)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", help="cpu or cuda for the attacks (default: the config's)")
    return parser
