"""Experiment configs as declared settings: each key of a config file is a dataclass field
(megex.settings.setting: default, help, check), so that a file's mistakes are named by key
with what was expected, and each default is written once.

Experiments read their config as a plain dict (it goes into JSON summaries and run jobs):
:func:`defaults` is the dataclass's defaults as a dict, :func:`load` a JSON file over them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..settings import Mapping, SettingError, default_of, setting

__all__ = ["SHARED_SETTINGS", "check_values", "defaults", "load", "shared_settings"]

# The attack settings every experiment gives every method, not searched: a small generator
# keeps the CPU runs short, the constant schedule lets one run report every budget, the
# weight average removes the swings of a constant learning rate, and the compute per query
# is the same for all.
SHARED_SETTINGS: dict[str, Any] = {
    "ngf": 8,
    "lr_schedule": "constant",
    "clone_ema": 0.999,
    "clone_updates_per_1k_queries": 25.0,
}


def shared_settings() -> Any:
    """The `settings` key of an experiment config: SHARED_SETTINGS, which a file's keys
    update."""
    return setting(
        SHARED_SETTINGS,
        "attack settings shared by every method (the file's keys update these)",
        Mapping(),
    )


def defaults(config_class: type) -> dict[str, Any]:
    """A config class's defaults as a fresh dict (nested values copied)."""
    values = {f.name: default_of(f) for f in dataclasses.fields(config_class)}
    return json.loads(json.dumps(values))


def load(
    config_class: type,
    path: str | os.PathLike | None,
    merged: tuple[str, ...] = ("settings", "method_settings"),
) -> dict[str, Any]:
    """The defaults of `config_class` updated by a JSON file's keys (if given), each checked
    by its field; the keys in `merged` hold objects that the file's update rather than
    replace. Unknown keys are refused; ValueError names the file, the key and the rule."""
    config = defaults(config_class)
    if path is None:
        return config
    user = json.loads(Path(path).read_text())
    unknown = set(user) - set(config) - {"description"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(config)}")
    check_values(config_class, {k: v for k, v in user.items() if k != "description"}, path)
    for key, value in user.items():
        if key in merged and isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def check_values(config_class: type, values: dict[str, Any], where: Any) -> None:
    """Check each of `values` by its key's field; ValueError names `where`, the key and
    the rule (unknown keys included)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
    for key, value in values.items():
        check = fields[key].metadata.get("check")
        if check is None or (value is None and fields[key].default is None):
            continue
        try:
            check.check(key, value)
        except SettingError as err:
            raise ValueError(f"{where}: {err}") from None
