"""`megex train-victim`: train a victim with its dataset's recipe and save it."""

from __future__ import annotations

import argparse
from typing import Any

from .. import data as data_mod
from ..models import CLASSIFIERS, build_classifier
from ..victim import sidecar_path, train_victim
from .common import (
    add_json_option,
    messages,
    positive_float,
    positive_int,
    print_json,
    whole_number,
)
from .errors import UsageError, user_input

__all__ = ["add_parser", "cmd_train_victim"]


def add_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "train-victim", help="train a victim and save it (safetensors + JSON)", **kwargs
    )
    p.add_argument("--dataset", choices=data_mod.DATASETS, required=True, help="dataset")
    p.add_argument(
        "--arch", choices=sorted(CLASSIFIERS), help="architecture (default: the dataset's recipe)"
    )
    p.add_argument("--epochs", type=positive_int, help="epochs (default: the recipe's)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument(
        "--validation-images",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="hold out the last N training images (what settings are chosen on)",
    )
    p.add_argument(
        "--pool-images",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="hold out the N training images before those too, for an attacker's pool of "
        "images the victim never saw (--pool DATASET:unseen:N)",
    )
    p.add_argument("--out", required=True, help="where to save (.safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_option(p)
    p.set_defaults(func=cmd_train_victim)


def cmd_train_victim(args: argparse.Namespace) -> int:
    ds = data_mod.load(args.dataset, args.data_root)
    if args.arch is not None:
        c, h, _ = ds.input_shape
        with user_input("--arch"):  # an architecture that does not fit the images
            build_classifier(args.arch, ds.num_classes, c, h)
    held = args.validation_images + args.pool_images
    if held >= len(ds.x_train):
        raise UsageError(
            f"--validation-images {args.validation_images} and --pool-images "
            f"{args.pool_images} leave no training images: {args.dataset} has "
            f"{len(ds.x_train)} (hold out fewer than that in all)"
        )
    victim = train_victim(
        ds,
        args.arch,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
        validation_images=args.validation_images,
        pool_images=args.pool_images,
    )
    path = victim.save(args.out)
    if args.json:
        print_json(
            {
                "path": str(path),
                "sidecar": str(sidecar_path(path)),
                "dataset": victim.dataset,
                "arch": victim.arch,
                "input_shape": list(victim.input_shape),
                "num_classes": victim.num_classes,
                "accuracy": victim.accuracy,
            }
        )
        return 0
    out = messages(args)
    print(
        f"victim {victim.arch} on {args.dataset}: test accuracy {100 * victim.accuracy:.2f}%",
        file=out,
    )
    print(f"saved to {path} (+ {sidecar_path(path).name})", file=out)
    return 0
