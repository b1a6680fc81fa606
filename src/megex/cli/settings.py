"""Attack settings on the command line: `megex attack --set NAME=VALUE` and `megex settings`.

Both read the settings' own metadata (megex.attacks.config): name, group, default, rule and
help are written once, on the dataclass field.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..attacks import ATTACKS, SettingError, describe_settings, parse_setting
from .errors import UsageError

# Set through their own flags (or not settable at all from the command line).
_NOT_SETTABLE = {"seed", "device", "explanation"}


def settable(method: str) -> list[dict[str, Any]]:
    """The settings `--set` accepts for a method, with their metadata."""
    described = describe_settings(ATTACKS[method].config_class)
    return [d for d in described if d["name"] not in _NOT_SETTABLE]


def setting_help(method: str, name: str) -> str:
    """A setting's help text and rule, as written on its field."""
    found = {d["name"]: d for d in describe_settings(ATTACKS[method].config_class)}[name]
    return f"{found['help']}{found['rule']}"


def parse_set_options(method: str, items: list[str]) -> dict[str, Any]:
    """--set NAME=VALUE pairs: any setting of the attack's config, typed by its default."""
    names = {d["name"] for d in settable(method)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(f"--set: expected NAME=VALUE, got {item!r}")
        if name not in names:
            raise UsageError(
                f"--set: {method} has no setting {name!r}; settable: {', '.join(sorted(names))} "
                "(megex settings lists them with their help)"
            )
        try:
            out[name] = parse_setting(ATTACKS[method].config_class, name, text)
        except SettingError as err:
            raise UsageError(f"--set {err}") from None
    return out


def add_settings_parser(subparsers: Any, **fmt: Any) -> None:
    p = subparsers.add_parser(
        "settings",
        help="list every attack setting with its default, rule and help",
        description="Every setting `megex attack --set NAME=VALUE` accepts, by group.",
        **fmt,
    )
    p.add_argument("--method", choices=sorted(ATTACKS), default="megex", help="attack")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_settings)


def cmd_settings(args: argparse.Namespace) -> int:
    rows = settable(args.method)
    if args.json:
        print(json.dumps(rows, default=list))
        return 0
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            print(f"\n[{group}]")
        print(f"  {row['name']} = {json.dumps(row['default'], default=list)}")
        print(f"      {row['help']}{row['rule']}")
    return 0
