"""`megex tradeoff`, `megex detection` and `megex art-peer`: what defences cost and take,
whether query monitors flag the attacks, and our knockoff beside ART's KnockoffNets
(megex.experiments.tradeoff, .detection and .art_comparison)."""

from __future__ import annotations

import argparse
from typing import Any

from ..experiments import art_comparison, detection, query_efficiency, tradeoff
from .bench import run_tool
from .common import positive_float, positive_int, whole_number
from .errors import UsageError
from .sweep_options import add_sweep_arguments

__all__ = [
    "add_art_peer_arguments",
    "add_detection_arguments",
    "add_parsers",
    "add_tradeoff_arguments",
]


def add_parsers(sub: Any, **kwargs: Any) -> None:
    """The `tradeoff`, `detection` and `art-peer` subcommands."""
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
        "for megex serve --monitor NAME:calibration=FILE. The calibrations and every stream's "
        "scores are kept in OUT/scores.jsonl.gz, from which --from-records writes the tables "
        "again.",
        **kwargs,
    )
    add_detection_arguments(p)
    p.set_defaults(func=lambda args: run_tool(_detection, args))
    p = sub.add_parser(
        "art-peer",
        help="our knockoff beside ART's KnockoffNets, with matched settings",
        description="For each victim, attack seed and budget, draw the config's pool with the "
        "seed and run ART's KnockoffNets (random sampling, probabilities) and our knockoff on "
        "the same victim and budget, with the same clone, Adam at lr 1e-3, batch 64 and number "
        "of clone updates; report test accuracy and fidelity with intervals, the paired "
        "difference, and seconds per 1,000 queries (JSON and markdown). Finished runs are kept "
        "and skipped on a rerun. Needs ART: pip install 'megex[art]'.",
        **kwargs,
    )
    add_art_peer_arguments(p)
    p.set_defaults(func=lambda args: run_tool(_art_peer, args))


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
    parser.add_argument(
        "--from-records",
        action="store_true",
        help="run nothing: write the tables and calibration files again from the run kept in "
        "OUT/scores.jsonl.gz (the --quick run with --quick); takes only --out and --quick",
    )
    return parser


# What --from-records leaves to the record: options that choose what a run measures.
_RUN_OPTIONS = (
    "config", "data_root", "queries", "seeds", "victim_seeds", "methods", "streams",
    "target_fpr", "settings_file", "device",
)  # fmt: skip


def _detection(args: argparse.Namespace) -> None:
    if not args.from_records:
        detection.run_detection(args)
        return
    given = [name for name in _RUN_OPTIONS if getattr(args, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(
            f"{flag}: --from-records runs nothing and takes the record's settings; it takes "
            "only --out and --quick"
        )
    detection.tables_from_records(args.out, quick=args.quick)


def add_art_peer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The comparison's options (the `megex art-peer` subcommand)."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="benchmark config JSON with a 'pool' (e.g. benchmarks/configs/pool-1k.json)",
    )
    parser.add_argument(
        "--budgets",
        type=positive_int,
        nargs="+",
        required=True,
        metavar="N",
        help="query budgets; each at most the pool's size (ART queries distinct pool images)",
    )
    parser.add_argument(
        "--victim-seeds",
        type=whole_number(),
        nargs="+",
        metavar="S",
        help="victims (recipe seeds; default: the config's victim_seeds)",
    )
    parser.add_argument(
        "--seeds",
        type=whole_number(),
        nargs="+",
        metavar="S",
        help="attack seeds, each drawing its own pool (default: the config's seeds)",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/art-peer",
        metavar="DIR",
        help="output folder: art_comparison.json, .md and the finished runs",
    )
    parser.add_argument(
        "--victims",
        metavar="DIR",
        help="folder of cached victims, trained there if missing (default: <out>/victims; "
        "benchmarks/results/pool-1k/victims reuses megex bench's)",
    )
    parser.add_argument("--data-root", metavar="DIR", help="folder holding the dataset's files")
    parser.add_argument(
        "--clone-updates-per-1k-queries",
        type=positive_float,
        metavar="X",
        help="training length of both methods: clone updates per 1,000 queries, rounded up "
        f"to whole ART epochs (default: {art_comparison.UPDATES_PER_1K_QUERIES:g})",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        metavar="E",
        help="a fixed number of ART epochs at every budget instead (both methods then make "
        "E x ceil(budget / 64) clone updates)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _art_peer(args: argparse.Namespace) -> None:
    config = query_efficiency.load_config(args.config)
    if not config.get("pool"):
        raise UsageError(
            f"--config {args.config}: no 'pool' (the attacker's images, e.g. "
            "'fashion-mnist:unseen:1000'); the comparison with ART needs one"
        )
    if args.epochs is not None and args.clone_updates_per_1k_queries is not None:
        raise UsageError("--epochs and --clone-updates-per-1k-queries: give one of them")
    art_comparison.compare_with_art(
        config,
        args.budgets,
        args.victim_seeds,
        args.seeds,
        args.out,
        clone_updates_per_1k_queries=args.clone_updates_per_1k_queries,
        epochs=args.epochs,
        victims=args.victims,
        data_root=args.data_root,
        threads=args.threads,
        progress=not args.no_progress,
    )
