"""`megex bench` and `megex tune`: the query-efficiency benchmark and the tuning search
behind its settings (megex.experiments.query_efficiency and megex.experiments.tuning)."""

from __future__ import annotations

import argparse
from typing import Any

from ..experiments import query_efficiency, tuning
from ..experiments.methods import METHODS
from ..experiments.tuning import SEARCH
from .common import positive_int, whole_number
from .errors import user_input
from .sweep_options import add_sweep_arguments

__all__ = ["add_bench_arguments", "add_parsers", "add_tune_arguments", "run_tool"]


def add_parsers(sub: Any, **kwargs: Any) -> None:
    """The `bench` and `tune` subcommands."""
    p = sub.add_parser("bench", help="query-efficiency benchmark: MEGEX vs DFME", **kwargs)
    add_bench_arguments(p)
    p.set_defaults(func=lambda args: run_tool(query_efficiency.run_benchmark, args))
    p = sub.add_parser(
        "tune", help="the tuning search behind the benchmark's settings (Optuna)", **kwargs
    )
    add_tune_arguments(p)
    p.set_defaults(func=lambda args: run_tool(tuning.run_search, args))


def run_tool(function: Any, args: argparse.Namespace) -> int:
    """Run an experiment on parsed options. An experiment's ValueErrors are about its
    settings (the --config file, a run folder holding other settings), which it checks as it
    plans its runs: the user's to fix."""
    with user_input():
        function(args)
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (the `megex bench` subcommand reuses them)."""
    parser.add_argument("--config", help="JSON file of benchmark settings (e.g. configs/svhn.json)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick", action="store_true", help="one victim, one seed, two budgets, no prior table"
    )
    parser.add_argument("--budgets", type=int, nargs="+", help="query budgets to report")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds (same for all)")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="methods to run")
    parser.add_argument(
        "--baseline",
        choices=sorted(METHODS),
        help="the predictions-only method the others are compared with, one of the methods "
        "run (default: the config's, dfme); the outputs are then <stem>_vs_<method>.*, beside "
        "the config's (finished runs are reused: with every run finished, this runs nothing)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="output folder (default: benchmarks/results)"
    )
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json; default: the config's "
        "tuned_settings); 'none': the package defaults, untuned",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    parser.add_argument(
        "--fresh", action="store_true", help="ignore finished runs and checkpoints; start over"
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: a table (<stem>_partial.*) of the finished runs, restricted to the "
        "(seed, victim) pairs on which every method has finished, so that it stays paired",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_sweep_arguments(parser, "runs")
    return parser


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="benchmark config JSON (dataset, validation, settings)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument("--out", default="benchmarks/results/tuning", help="studies and output")
    parser.add_argument(
        "--trials", type=int, help=f"trials per method (default {SEARCH['trials']})"
    )
    parser.add_argument("--budget", type=int, help=f"queries per trial run ({SEARCH['budget']})")
    parser.add_argument(
        "--marks",
        type=positive_int,
        nargs="+",
        help="query counts at which a trial's validation accuracy is averaged (default: "
        f"{SEARCH['marks']} below --budget, and --budget)",
    )
    parser.add_argument("--methods", nargs="+", help="methods to search (default: all)")
    parser.add_argument(
        "--confirm-trials",
        type=whole_number(0),
        help="score each method's N best trials again on the --confirm-seeds and choose by "
        f"the mean over all seeds (default {SEARCH['confirm_trials']}: the search's best)",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        nargs="+",
        help=f"tuning seeds of that step (default {SEARCH['confirm_seeds']})",
    )

    parser.add_argument(
        "--no-published-trial",
        action="store_true",
        help="queue no trial of each method's published settings (by default each study "
        "runs them as one more trial; a study that has it keeps it)",
    )
    parser.add_argument(
        "--parallel-trials",
        type=positive_int,
        default=1,
        help="workers on each method's study at once (each runs one trial at a time)",
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage URL every worker reaches (default: sqlite:///OUT/studies.db, "
        "for one machine; on a cluster postgresql://... or mysql://...)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    add_sweep_arguments(parser, "trial workers")
    return parser
