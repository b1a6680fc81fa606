"""What the commands share: option types, the help format, output, victims and test sets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from .. import data as data_mod
from ..engine import run
from ..evaluate import Evaluator
from ..explain import OUTPUTS, parse_target
from ..runs import RunFolder
from ..settings import COUNT, POSITIVE, Number, SettingError
from ..victim import Victim
from .errors import UsageError, user_input

__all__ = [
    "HelpFormatter",
    "add_explanation_options",
    "add_json_option",
    "cache_dir",
    "clear_run_folder",
    "evaluator_for",
    "fraction",
    "is_url",
    "load_victim",
    "messages",
    "number_type",
    "port",
    "positive_float",
    "positive_int",
    "print_json",
    "run_attack",
    "shows_default",
    "target",
    "whole_number",
]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or names it itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "(default" not in text and shows_default(action):
            text += " (default: %(default)s)"
        return text


def shows_default(action: argparse.Action) -> bool:
    """Whether an option's help should show its default: it takes a value and has one."""
    default = action.default
    unset = default is None or default == [] or default is argparse.SUPPRESS
    return action.nargs != 0 and not unset


def number_type(check: Number) -> Callable[[str], int | float]:
    """An argparse type that reads a number as a declared setting's rule does
    (:class:`megex.settings.Number`): the one way the commands type a number."""

    def parse(text: str) -> int | float:
        try:
            return check.parse(text)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "number"  # what argparse names in "invalid number value"
    return parse


# A whole number >= 1, a number > 0, a fraction in (0, 1].
positive_int = number_type(COUNT)
positive_float = number_type(POSITIVE)
fraction = number_type(Number(0, 1, low_open=True))


def whole_number(minimum: int = 0) -> Callable[[str], int | float]:
    """An argparse type: a whole number, at least `minimum`."""
    return number_type(Number(minimum, whole=True))


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return int(text)


def target(text: str) -> str | int:
    """An explanation target: 'predicted', 'all' or a class index (explain.parse_target)."""
    try:
        return parse_target(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_explanation_options(
    group: Any, methods: Sequence[str], default_target: str, method_help: str
) -> None:
    """--explanation-method, --explanation-target and --explanation-output."""
    group.add_argument(
        "--explanation-method", choices=methods, default="gradient", help=method_help
    )
    group.add_argument(
        "--explanation-target",
        type=target,
        default=default_target,
        help="'predicted', 'all' or a class index",
    )
    group.add_argument(
        "--explanation-output",
        choices=OUTPUTS,
        default="probability",
        help="quantity differentiated",
    )


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON document on stdout; messages go to stderr",
    )


def messages(args: argparse.Namespace) -> IO[str]:
    """Where a command's prose goes: stdout, or stderr when stdout carries --json."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def print_json(document: Any) -> None:
    """One JSON document, on one line of stdout."""
    print(json.dumps(document, sort_keys=True, default=str), flush=True)


def cache_dir() -> Path:
    base = os.environ.get("MEGEX_CACHE") or os.path.join(Path.home(), ".cache", "megex")
    return Path(base)


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def load_victim(path: str) -> Any:
    """A victim file the user named: a missing file fails (1), a wrong kind is a mistake (2)."""
    with user_input():
        return Victim.load(path)


def evaluator_for(dataset: str | None, data_root: str | None, victim: Any = None) -> Any:
    """An evaluator on the test set of `dataset` (None: no evaluation)."""
    if dataset is None:
        return None
    x, y = data_mod.load(dataset, data_root).test_tensors()
    if victim is not None:
        if tuple(x.shape[1:]) != tuple(victim.input_shape):
            raise UsageError(
                f"--dataset: {dataset} images are {tuple(x.shape[1:])}; the victim takes "
                f"{tuple(victim.input_shape)}"
            )
        return Evaluator.from_victim(victim, x, y)
    return Evaluator(x, y)


# What a run writes into its folder: removed before a run starts over in the same folder.
RUN_FILES = (
    "checkpoint.pt",
    "metrics.jsonl",
    "result.json",
    "config.json",
    "clone.safetensors",
    "clone.json",
)


def clear_run_folder(folder: RunFolder) -> None:
    """Remove an earlier run's files from `folder` (other files stay)."""
    if folder.path.exists():
        for name in RUN_FILES:
            (folder.path / name).unlink(missing_ok=True)


def run_attack(attack: Any, oracle: Any, budget: int | None = None, **options: Any) -> Any:
    """Run `attack` against `oracle` (the one place the commands start an attack's loop)."""
    return run(attack, oracle, budget, **options)
