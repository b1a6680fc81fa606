"""`megex input-size` and `megex gradient-alignment`: the benchmark at several input sizes,
and how well DFME's zeroth-order gradient aligns with the exact one there
(megex.experiments.input_size and megex.experiments.gradient_alignment)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..experiments import gradient_alignment, input_size
from ..experiments.gradient_alignment import DIRECTIONS
from ..experiments.input_size import SIZES, check_search
from ..experiments.query_efficiency import load_config
from .common import positive_float, positive_int, whole_number
from .errors import UsageError, user_input

__all__ = ["FORWARDS_UNKNOWN_OPTIONS", "Steps", "add_parsers", "search_command"]


@dataclass(frozen=True)
class Steps:
    """How input-size checks (`check(argv)`: parse only) and runs (`run(argv)`: the exit
    status) a megex command line of its own."""

    check: Callable[[list[str]], Any]
    run: Callable[[list[str]], int]


# The commands whose unknown options are passed on (to megex bench, for every size).
FORWARDS_UNKNOWN_OPTIONS = ("input-size",)
# The options of gradient-alignment that choose what is measured: --from-records takes the
# record's instead.
_MEASURE_OPTIONS = ("sizes", "directions", "batches", "batch_size", "epsilon", "train_queries",
                    "seed", "victims_root", "data_root", "threads")  # fmt: skip


def add_parsers(sub: Any, steps: Steps, **kwargs: Any) -> None:
    """The `input-size` and `gradient-alignment` subcommands; `steps` checks and runs the
    megex command lines that input-size runs for each size (megex tune, megex bench)."""
    _add_input_size(sub, steps, **kwargs)
    _add_gradient_alignment(sub, **kwargs)


def _add_input_size(sub: Any, steps: Steps, **kwargs: Any) -> None:
    """The `input-size` subcommand: its options (the rest go to megex bench)."""
    p = sub.add_parser(
        "input-size",
        help="the query-efficiency benchmark at every input size, then one table across sizes",
        description="The query-efficiency benchmark at every input size, then one table "
        "across sizes. Options not listed here (--jobs, --threads, --budgets, --seeds, "
        "--victim-seeds, --methods, --no-plot, --no-progress, --fresh, --ray ...) are passed "
        "to megex bench for every size.",
        **kwargs,
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=list(SIZES),
        help="sizes to run, in this order (default: all)",
    )
    p.add_argument(
        "--configs",
        default="benchmarks/configs",
        help="folder holding dim-<size>.json (default: benchmarks/configs)",
    )
    p.add_argument(
        "--out",
        default="benchmarks/results/dims",
        help="output folder; size s goes to OUT/s (default: benchmarks/results/dims)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="megex bench --quick at every size (a size's search is not shortened)",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing; write the table across sizes from the finished benchmarks "
        "(the table always covers every size finished under --out)",
    )
    p.set_defaults(func=lambda args: run_input_size(args, steps), forwarded=[])


def _add_gradient_alignment(sub: Any, **kwargs: Any) -> None:
    """The `gradient-alignment` subcommand and its options."""
    p = sub.add_parser(
        "gradient-alignment",
        help="how well DFME's zeroth-order gradient aligns with the exact one, at each size",
        description="How well DFME's zeroth-order gradient aligns with the exact one, at each "
        "input size (megex.experiments.gradient_alignment).",
        **kwargs,
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=list(SIZES),
        help="sizes to measure, in this order (default: all)",
    )
    p.add_argument(
        "--directions", nargs="+", type=positive_int, default=list(DIRECTIONS), help="values of m"
    )
    p.add_argument("--batches", type=positive_int, default=20, help="batches per m (default 20)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (64)")
    p.add_argument(
        "--epsilon", type=positive_float, default=1e-3, help="forward-difference step (DFME's 1e-3)"
    )
    p.add_argument(
        "--train-queries",
        type=whole_number(0),
        default=20_000,
        help="queries of DFME before the second measurement (0: none; default 20000)",
    )
    p.add_argument(
        "--seed",
        type=whole_number(0),
        default=0,
        help="seed of DFME's models, its training run and the random directions",
    )
    p.add_argument(
        "--victims-root",
        default="benchmarks/results/dims",
        help="victims are read from (or trained into) ROOT/<size>/victims, the size sweep's "
        "folders (default: benchmarks/results/dims)",
    )
    p.add_argument("--data-root", help="folder holding Fashion-MNIST's files")
    p.add_argument("--out", default="benchmarks/results/gradient_alignment", help="output folder")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--from-records",
        action="store_true",
        help="measure nothing: write the table and plot again from OUT/measurements.jsonl.gz "
        "(what a run keeps); takes only --out and --no-plot",
    )
    p.set_defaults(
        func=run_gradient_alignment,
        measure_defaults={name: p.get_default(name) for name in _MEASURE_OPTIONS},
    )


def run_input_size(args: argparse.Namespace, run: Steps) -> int:
    """Each size's search (if its config has one) and benchmark, then the table across sizes;
    the exit status of the first step that fails, else 0."""
    forwarded, out = list(args.forwarded), Path(args.out)
    steps: list[tuple[str, list[str]]] = []
    for size in args.sizes:
        config = Path(args.configs) / f"dim-{size}.json"
        if not config.is_file():
            raise UsageError(f"--configs: no {config.name} in {args.configs}")
        try:
            search = load_config(config).get("search")
            if search is not None:
                check_search(search, config.name)
        except ValueError as err:
            raise UsageError(str(err)) from None
        command = ["bench", "--config", str(config), "--out", str(out / size), *forwarded]
        if search:
            # This size's own search first (resumable); the benchmark reads its output.
            tuning = out / size / "tuning"
            steps.append((size, search_command(config, tuning, search, forwarded)))
            command += ["--settings-file", str(tuning / "tuned.json")]
        steps.append((size, [*command, "--quick"] if args.quick else command))
    # Every step's options are checked before the first one starts (hours later, a typo
    # would stop the sweep half way).
    for _, command in steps:
        run.check(command)
    if not args.summary_only:
        for size, command in steps:
            print(f"input-size: size {size}: megex {' '.join(command)}", file=sys.stderr)
            status = run.run(command)
            if status:
                return status
    stem = "query_efficiency_quick" if args.quick else "query_efficiency"
    # Every size with a finished benchmark under --out, not only those run now: running one
    # size alone must not drop the others from the table across sizes.
    summary = input_size.combine(out, list(SIZES), stem)
    if not summary["sizes"]:
        print(f"megex input-size: no finished benchmark under {out}", file=sys.stderr)
        return 1
    stem = "dimension_quick" if args.quick else "dimension"
    paths = input_size.write_outputs(summary, out, stem)
    print(f"input-size: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def search_command(
    config: Path, out: Path, search: dict[str, Any], forwarded: list[str]
) -> list[str]:
    """`megex tune` for one size's config: its search's methods, trials, budget and
    confirmation step, and the
    sweep's options that a search has too (workers, threads, device, data, Ray)."""
    shared = argparse.ArgumentParser(add_help=False)
    for option in ("--jobs", "--threads", "--device", "--data-root", "--retries"):
        shared.add_argument(option)
    shared.add_argument("--ray", nargs="?", const="")
    known, _ = shared.parse_known_args(forwarded)
    command = ["tune", "--config", str(config), "--out", str(out)]
    for option, value in vars(known).items():
        if value is not None:
            flag = "--" + option.replace("_", "-")
            command += [flag] if value == "" else [flag, value]
    command += ["--methods", *search["methods"]]
    for key in ("trials", "budget", "confirm_trials"):
        if key in search:
            command += [f"--{key.replace('_', '-')}", str(search[key])]
    if "confirm_seeds" in search:
        command += ["--confirm-seeds", *(str(seed) for seed in search["confirm_seeds"])]
    return command


def run_gradient_alignment(args: argparse.Namespace) -> int:
    """Measure the alignment at each size, or read the measurements kept by an earlier run
    (--from-records); write JSON, markdown and PNG."""
    out, plot_too = Path(args.out), not args.no_plot
    if args.from_records:
        changed = [n for n, v in args.measure_defaults.items() if getattr(args, n) != v]
        if changed:
            raise UsageError(
                f"--{changed[0].replace('_', '-')}: --from-records measures nothing and takes "
                "the record's settings; it takes only --out and --no-plot"
            )
        with user_input("--out"):
            paths = gradient_alignment.tables_from_records(out, plot_too=plot_too)
        print(f"alignment: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    record = gradient_alignment.measure_sizes(
        args.sizes,
        victims_root=args.victims_root,
        train_queries=args.train_queries,
        directions=tuple(sorted(set(args.directions))),
        batches=args.batches,
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        seed=args.seed,
        data_root=args.data_root,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    record.settings["wall_s"] = round(time.time() - t0, 1)
    record.settings["threads"] = args.threads
    paths = gradient_alignment.write_outputs(record, out, plot_too=plot_too)
    print(f"alignment: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0
