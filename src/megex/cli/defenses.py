"""`megex defenses` (the defences a service can apply) and `megex utility` (what they cost
in explanation quality, on the victim's test images)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from .. import data as data_mod
from ..defenses import SIDES, build_defense, describe_defenses
from ..experiments.utility import explanation_utility, utility_table
from ..explain import METHODS, Explanation
from .common import (
    add_explanation_options,
    add_json_option,
    fraction,
    load_victim,
    messages,
    positive_int,
    print_json,
)
from .errors import UsageError, user_input

__all__ = ["add_parsers", "cmd_defenses", "cmd_utility", "parse_row"]

DEFENSE_HELP = (
    "defence spec: NAME, NAME:VALUE or NAME:PARAM=VALUE,PARAM=VALUE, e.g. round:2, noise:0.5, "
    "quantize:bits=4, reverse-sigmoid:beta=0.5,gamma=0.2"
)


def add_parsers(sub: Any, **kwargs: Any) -> None:
    """The `defenses` and `utility` subcommands."""
    p = sub.add_parser(
        "defenses",
        help="list the defences a service can apply, with their parameters",
        description="Every defence `--defense` accepts (megex attack, serve and utility): "
        "its side (prediction or explanation), parameters with defaults and rules, and what "
        "it does.",
        **kwargs,
    )
    add_json_option(p)
    p.set_defaults(func=cmd_defenses)
    _add_utility_parser(sub, **kwargs)


def _add_utility_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "utility",
        help="what defences cost in explanation quality, on the victim's test images",
        description="Explanation utility of a victim's service without a defence (row "
        "'none') and under each --defense: similarity of the defended maps to the undefended "
        "ones (cosine, Spearman, top-k overlap), faithfulness to the victim (deletion and "
        "insertion AUC) and the change in returned probabilities; mean and 95% interval "
        "over images.",
        **kwargs,
    )
    p.add_argument("--victim", required=True, metavar="PATH", help="victim .safetensors file")
    p.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"one row of the table: a {DEFENSE_HELP}; join specs with '+' to apply several "
        "in order (repeatable)",
    )
    p.add_argument(
        "--images", type=positive_int, default=200, help="test images, drawn at random by --seed"
    )
    p.add_argument(
        "--dataset",
        choices=data_mod.DATASETS,
        help="test set (default: the victim's own)",
    )
    p.add_argument("--data-root", help="folder holding the dataset's files")
    ex = p.add_argument_group("the explanation the service returns")
    add_explanation_options(ex, METHODS, "predicted", "explanation method")
    _add_measure_options(p.add_argument_group("the measures"))
    p.add_argument("--seed", type=int, default=0, help="seed of the images drawn and of the noise")
    add_json_option(p)
    p.set_defaults(func=cmd_utility)


def _add_measure_options(ms: Any) -> None:
    ms.add_argument(
        "--steps",
        type=positive_int,
        default=16,
        help="deletion and insertion: steps from the image to the baseline (pixels per step: "
        "ceil(H*W / steps))",
    )
    ms.add_argument(
        "--top-fraction",
        type=fraction,
        default=0.1,
        help="top-k overlap: k as a fraction of the values of a map",
    )
    ms.add_argument(
        "--baseline",
        type=float,
        default=0.0,
        help="deletion and insertion: the value of a removed pixel (0: black)",
    )
    ms.add_argument(
        "--faithfulness",
        choices=("torch", "quantus"),
        default="torch",
        help="who computes the deletion curve: megex, or Quantus's pixel flipping "
        "(pip install 'megex[utility]')",
    )


def cmd_defenses(args: argparse.Namespace) -> int:
    described = describe_defenses()
    if args.json:
        print_json(described)
        return 0
    for side in SIDES:
        print(f"[{side}]")
        for entry in (d for d in described if d["side"] == side):
            aliases = f" (also {', '.join(entry['aliases'])})" if entry["aliases"] else ""
            print(f"  {entry['name']}{aliases}: {entry['summary']}")
            for param in entry["params"]:
                default = _text(param["default"])
                print(f"      {param['name']}={default}  {param['help']}; {param['rule']}")
        print()
    print(
        "Specs: NAME, NAME:VALUE (its first parameter) or NAME:PARAM=VALUE,PARAM=VALUE; "
        "repeat --defense to apply several in order."
    )
    return 0


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# A '+' that starts another spec (a name follows), not one inside a number such as 1e+3.
_JOIN = re.compile(r"\+(?=\s*[A-Za-z])")


def parse_row(text: str) -> list[Any]:
    """One table row from `--defense`: specs joined by '+', built in order."""
    parts = [part.strip() for part in _JOIN.split(text)]
    if not all(parts):
        raise ValueError(f"defense: empty spec in {text!r}")
    return [build_defense(part) for part in parts]


def cmd_utility(args: argparse.Namespace) -> int:
    victim = load_victim(args.victim)
    with user_input("--defense"):
        rows = [parse_row(text) for text in args.defense]
    with user_input("--explanation-*"):
        explanation = Explanation(
            args.explanation_method,
            target=args.explanation_target,
            output=args.explanation_output,
        )
    dataset = args.dataset or victim.dataset
    if dataset is None:
        raise UsageError("--dataset: needed, the victim does not name its dataset")
    x, _ = data_mod.load(dataset, args.data_root).test_tensors()
    if tuple(x.shape[1:]) != tuple(victim.input_shape):
        raise UsageError(
            f"--dataset: {dataset} images are {tuple(x.shape[1:])}; the victim takes "
            f"{tuple(victim.input_shape)}"
        )
    chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    images = x[chosen[: args.images]]
    with user_input():
        # Its ValueErrors name what they are about: a defence that cannot apply to the
        # explanation (smooth with integrated gradients), steps that Quantus cannot take.
        result = explanation_utility(
            victim,
            images,
            rows,
            explanation,
            steps=args.steps,
            top_fraction=args.top_fraction,
            baseline=args.baseline,
            seed=args.seed,
            faithfulness=args.faithfulness,
        )
    result = {"victim": args.victim, "dataset": dataset, **result}
    if args.json:
        print_json(result)
        return 0
    out = messages(args)
    print(
        f"explanation utility of {args.victim} on {result['images']} {dataset} test images, "
        f"explanation {explanation.describe()}; mean [95% interval] over images",
        file=out,
    )
    print(utility_table(result), file=out)
    print(
        f"top-k: k = {result['top_k']} values per map; deletion and insertion: "
        f"{result['steps']} steps to baseline {result['baseline']:g} "
        f"({result['faithfulness']}); up arrows: higher is better",
        file=out,
    )
    return 0
