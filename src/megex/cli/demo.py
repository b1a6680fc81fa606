"""`megex demo`: train (or reuse) a small victim, run MEGEX and DFME at one budget, report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import IO, Any

from .. import data as data_mod
from ..attacks import ATTACKS
from ..evaluate import Evaluator
from ..explain import Explanation
from ..oracle import LocalOracle
from ..report import write_report
from ..runs import RunFolder
from ..victim import cached_victim as load_or_train
from .common import (
    add_json_option,
    cache_dir,
    clear_run_folder,
    messages,
    positive_int,
    print_json,
    run_attack,
)
from .evaluate import report_document

__all__ = ["DEMO_SETTINGS", "add_parser", "cached_victim", "cmd_demo"]

# Budget per attack, and attack settings sized for 2 CPU cores: a narrow generator (ngf 8)
# costs 20x less than DFME's ngf 64 at 28x28 and measured no worse (docs/results/).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"budget": 100_000, "attack": {"batch_size": 128}},
    "fashion-mnist": {"budget": 60_000, "attack": {"batch_size": 128, "ngf": 8}},
}


def add_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "demo", help="train a small victim, run MEGEX and DFME, print a table", **kwargs
    )
    p.add_argument("--dataset", choices=sorted(DEMO_SETTINGS), default="digits", help="dataset")
    p.add_argument(
        "--budget",
        type=positive_int,
        help="queries per attack (default: 100000 on digits, 60000 on fashion-mnist)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks")
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--out", default="megex-demo", help="folder for runs, report and plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_option(p)
    p.set_defaults(func=cmd_demo)


def cached_victim(
    dataset: str, data_root: str | None, seed: int, quiet: bool, out: IO[str] | None = None
) -> Any:
    """The demo's victim for `dataset`: loaded from the cache, or trained and cached."""
    victim, _ = load_or_train(
        cache_dir() / "victims",
        dataset,
        seed=seed,
        data_root=data_root,
        progress=not quiet,
        log=lambda line: print(line, file=out),
    )
    return victim


def cmd_demo(args: argparse.Namespace) -> int:
    out_text = messages(args)
    start = time.time()
    settings = DEMO_SETTINGS[args.dataset]
    budget = args.budget or settings["budget"]
    victim = cached_victim(args.dataset, args.data_root, 0, args.quiet, out_text)
    x, y = data_mod.load(args.dataset, args.data_root).test_tensors()
    evaluator = Evaluator.from_victim(victim, x, y)
    out = Path(args.out) / args.dataset
    methods = [
        ("megex", "megex", {"explanation": Explanation("gradient", target="all")}),
        ("megex-predicted", "megex", {"explanation": Explanation("gradient")}),
        ("dfme", "dfme", {}),
    ]
    print(
        f"victim {victim.arch}: test accuracy {100 * evaluator.victim_accuracy:.1f}%; "
        f"attacking with {budget:,} queries each, seed {args.seed}",
        file=out_text,
    )
    run_paths = []
    for label, method, extra in methods:
        folder = RunFolder(out / label).create()
        clear_run_folder(folder)
        folder.write_config(
            {"label": label, "dataset": args.dataset, "victim_accuracy": evaluator.victim_accuracy}
        )
        oracle = LocalOracle(victim, budget=budget, seed=args.seed)
        attack = ATTACKS[method](seed=args.seed, **settings["attack"], **extra)
        run_attack(
            attack,
            oracle,
            evaluator=evaluator,
            run_dir=folder.path,
            progress=not args.quiet,
            service_state=oracle.state_dict,
        )
        run_paths.append(folder.path)
    md, png, table = write_report(run_paths, out, evaluator.victim_accuracy)
    elapsed = time.time() - start
    if args.json:
        print_json(
            {
                **report_document(md, png),
                "dataset": args.dataset,
                "budget": budget,
                "seed": args.seed,
                "victim_arch": victim.arch,
                "runs_folder": str(out),
                "elapsed_s": round(elapsed, 1),
            }
        )
        return 0
    print(file=out_text)
    print(table, file=out_text)
    print(f"report: {md}", file=out_text)
    print(f"plot:   {png}" if png else "plot:   skipped (matplotlib not installed)", file=out_text)
    print(f"runs:   {out}/<method>/ ({elapsed:.0f} s in all)", file=out_text)
    return 0
