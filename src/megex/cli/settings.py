"""`megex attack --set NAME=VALUE`: any field of the attack's config, typed by its default."""

from __future__ import annotations

import json
from typing import Any

from ..attacks import ATTACKS
from .errors import UsageError

# Set through their own flags (or not settable at all from the command line).
_NOT_SETTABLE = {"seed", "device", "explanation"}


def _parse_set_options(method: str, items: list[str]) -> dict[str, Any]:
    """--set NAME=VALUE pairs: any field of the attack's config; values are JSON or text."""
    import dataclasses

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(ATTACKS[method].config_class)
        if f.name not in _NOT_SETTABLE
    }
    fields = set(defaults)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(f"--set: expected NAME=VALUE, got {item!r}")
        if name not in fields:
            raise UsageError(
                f"--set: {method} has no setting {name!r}; settable: {', '.join(sorted(fields))}"
            )
        out[name] = _setting_value(name, text, defaults[name])
    return out


def _setting_value(name: str, text: str, default: Any) -> Any:
    """`text` as the type of the setting's default (JSON syntax for numbers and lists)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, kind = number, "a number"
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        kind = "a JSON list of numbers, e.g. [0.5, 4.5]"
        value = tuple(value) if ok else value
    elif isinstance(default, str):
        ok, kind, value = True, "text", text
    else:  # None by default: a number or text
        ok, kind = True, "a value"
    if not ok:
        raise UsageError(f"--set {name}: expected {kind}, got {text!r}")
    return value
