"""The command line of ``benchmarks/peers/data_free.py``: the arguments, the victim and our
test split, the plan, and the table written from the rows.

    python benchmarks/peers/data_free.py --victim FILE [--dataset fashion-mnist]
        [--budgets 25000 50000 100000] [--seeds 0 1] [--mebench PATH] [--disguide PATH]
        [--dual-students PATH] [--out DIR] [--schedule constant|published] [--tuned FILE]
        [--test-images N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megex import data as data_module
from megex.attacks.base import default_clone_arch
from megex.cli.common import positive_int, whole_number
from megex.evaluate import Evaluator
from megex.runs import write_text_atomic
from megex.victim import Victim

from .errors import UserError
from .peer_imports import authors_root, dual_students_root, git_commit, mebench_root
from .rows import AUTHORS, DUAL_STUDENTS, MEBENCH, sha256
from .run_rows import Setup, run_all
from .table import markdown, summarise

ROOT = Path(__file__).resolve().parents[3]
RESULTS_STEM = "data_free_peers"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="data_free.py",
        description="DFME, DisGUIDE and dual students: public implementations beside ours, "
        "on one victim.",
    )
    parser.add_argument("--victim", required=True, type=Path, help="victim .safetensors file")
    parser.add_argument("--dataset", help="the victim's dataset (default: its own record)")
    parser.add_argument("--data-root", help="where the dataset's files are")
    parser.add_argument(
        "--budgets", nargs="+", type=positive_int, default=[25_000, 50_000, 100_000]
    )
    parser.add_argument("--seeds", nargs="+", type=whole_number(0), default=[0])
    parser.add_argument(
        "--mebench", type=Path, help="checkout of caumin/model-extraction-benchmark"
    )
    parser.add_argument("--disguide", type=Path, help="checkout of lin-tan/disguide")
    parser.add_argument(
        "--dual-students", type=Path, help="checkout of James-Beetham/dual_students"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers-data-free"))
    parser.add_argument(
        "--schedule",
        choices=("constant", "published"),
        default="constant",
        help="constant: no learning-rate decay anywhere; published: each one's decays at "
        "fractions of the largest budget",
    )
    parser.add_argument(
        "--tuned",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "tuning" / "tuned.json",
        help="the searched settings for our tuned dfme, disguide and dual-students (a method "
        "it does not hold yet is not run)",
    )
    parser.add_argument(
        "--test-images", type=positive_int, help="evaluate on the first N test images"
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    return parser.parse_args(argv)


def _load_victim(args: argparse.Namespace) -> tuple[Victim, str]:
    if not args.victim.is_file():
        raise UserError(f"--victim: no file at {args.victim}")
    try:
        victim = Victim.load(args.victim)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"--victim: {err}") from None
    dataset = args.dataset or victim.dataset
    if dataset is None:
        raise UserError("--dataset: the victim does not record its dataset; name it")
    if victim.dataset is not None and dataset != victim.dataset:
        raise UserError(f"--dataset: {dataset!r}, but the victim was trained on {victim.dataset!r}")
    if dataset not in data_module.DATASETS:
        raise UserError(
            f"--dataset: unknown {dataset!r}; expected one of {', '.join(data_module.DATASETS)}"
        )
    return victim, dataset


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except UserError as err:
        print(f"data_free.py: error: {err}", file=sys.stderr)
        return 2


def _peer_folders(args: argparse.Namespace) -> dict[str, Path]:
    """The peers' folders given, checked."""
    peers: dict[str, Path] = {}
    if args.mebench is not None:
        peers[MEBENCH] = mebench_root(args.mebench)
    if args.disguide is not None:
        peers[AUTHORS] = authors_root(args.disguide)
    if args.dual_students is not None:
        peers[DUAL_STUDENTS] = dual_students_root(args.dual_students)
    return peers


def _test_split(
    args: argparse.Namespace, dataset: str, victim: Victim
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our test split of `dataset` (its first --test-images images, where given)."""
    try:
        ds = data_module.load(dataset, args.data_root)
    except data_module.DatasetNotFound as err:
        raise UserError(f"--dataset: {err}") from None
    x_test, y_test = ds.test_tensors()
    if tuple(x_test.shape[1:]) != tuple(victim.input_shape):
        raise UserError(
            f"--dataset: {dataset}'s images are {tuple(x_test.shape[1:])}, the victim takes "
            f"{tuple(victim.input_shape)}"
        )
    if args.test_images is not None:
        x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    return x_test, y_test


def _main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    budgets = sorted(set(args.budgets))
    seeds = list(dict.fromkeys(args.seeds))
    victim, dataset = _load_victim(args)
    peers = _peer_folders(args)
    if not args.tuned.is_file():
        raise UserError(f"--tuned: no file at {args.tuned} (our tuned methods' settings)")
    x_test, y_test = _test_split(args, dataset, victim)
    clone_arch = default_clone_arch(tuple(victim.input_shape))
    setup = Setup(
        victim=victim,
        budgets=budgets,
        evaluator=Evaluator.from_victim(victim, x_test, y_test),
        clone_arch=clone_arch,
        schedule=args.schedule,
        tuned=args.tuned,
        out=args.out,
        peers=peers,
    )

    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    commits = {name: git_commit(path) or "unknown" for name, path in peers.items()}
    plan_base = {
        "victim_sha256": sha256(args.victim),
        "dataset": dataset,
        "budgets": budgets,
        "schedule": args.schedule,
        "test_images": len(x_test),
        "clone_arch": clone_arch,
    }
    not_given = [
        f"{flag} (the {name} rows)"
        for flag, name in (
            ("--mebench", MEBENCH),
            ("--disguide", AUTHORS),
            ("--dual-students", DUAL_STUDENTS),
        )
        if name not in peers
    ]
    if not_given:
        print(f"peers not given: {', '.join(not_given)}; running those that are, and ours")

    rows, failed = run_all(setup, seeds, plan_base, commits)
    header = {
        "dataset": dataset,
        "victim": str(args.victim),
        "victim_accuracy": setup.evaluator.victim_accuracy,
        "clone_arch": clone_arch,
        "schedule": args.schedule,
        "test_images": len(x_test),
        "threads": args.threads,
        "commits": commits,
        "peers_not_given": ", ".join(not_given),
    }
    _write_results(args.out, header, summarise(rows, budgets), rows)
    return 1 if failed else 0


def _write_results(
    out: Path, header: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """The table as markdown (also printed) and everything as JSON."""
    text = markdown(summary, header)
    doc = {**header, **summary, "rows": rows}
    write_text_atomic(out / f"{RESULTS_STEM}.json", json.dumps(doc, indent=1) + "\n")
    write_text_atomic(out / f"{RESULTS_STEM}.md", text)
    print()
    print(text, end="")
    print(f"\nwrote {out / RESULTS_STEM}.md and .json; one file per run under {out / 'runs'}")
