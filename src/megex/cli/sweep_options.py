"""--jobs, --ray and --retries: how a command's runs (or trials) are spread, the same for
every experiment (bench, tune, tradeoff, detection, input-size)."""

from __future__ import annotations

import argparse

from .common import positive_int, whole_number

__all__ = ["add_sweep_arguments"]


def add_sweep_arguments(parser: argparse.ArgumentParser, unit: str = "runs") -> None:
    """Add the options of megex.experiments.sweep.run_jobs to `parser`, naming `unit`."""
    parser.add_argument(
        "--jobs",
        type=positive_int,
        help=f"{unit} at once: local processes (default 1); with --ray, at most this many "
        "Ray tasks (default: as many as the cluster's CPUs and GPUs allow)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"run the {unit} as Ray tasks (pip install 'megex[ray]'): alone, on a new Ray "
        "instance on this machine; with an ADDRESS (auto, HOST:6379, ray://HOST:10001), on "
        "that cluster. --out must then be a folder every machine sees",
    )
    parser.add_argument(
        "--retries",
        type=whole_number(0),
        default=2,
        help=f"times one of the {unit} is started again (from its checkpoint) when its worker dies",
    )
