"""What a run folder records so that a run can be continued exactly: the run's settings
(config.json), the check that a resumed run keeps them, and the checkpoint.

A resumed run must be the run it continues: the same attack settings, budget, victim shape
and defences. Only settings that change speed and float rounding, not what the run does,
may differ (:data:`RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..oracle import Oracle
from ..runs import RunFolder

__all__ = [
    "RESUMABLE_CHANGES",
    "Recorded",
    "SETTINGS_ADDED_SINCE",
    "check_same_settings",
    "changed_settings",
    "describe_run",
    "save_checkpoint",
]

# Settings that may differ between an interrupted run and its resumption (they change speed
# and float rounding, not what the run does); the device only while the attack's random
# generator is on the host (on_device keeps it on the device, whose state does not transfer).
RESUMABLE_CHANGES = frozenset({"device", "compile"})
# Settings added after runs were recorded without them, with the value every such run had
# (the speed settings, megex.accel). A fact about past runs, not the current defaults: it
# stays as it is if a default changes.
SETTINGS_ADDED_SINCE: dict[str, Any] = {
    "precision": "fp32",
    "compile": "off",
    "on_device": False,
    "lr_scaling": "none",
    # The adaptive attacker with images' reading of its answers (megex.attacks.adaptive).
    "answers_as": "probabilities",
}
# Recorded only when set (describe_run): a run made behind a defence is not one without.
_RECORDED_WHEN_SET = ("defenses",)
_UNRECORDED = object()


class Recorded(Protocol):
    """What a run folder records of an attack: its settings and its state."""

    def describe(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...


def describe_run(attack: Recorded, oracle: Oracle, budget: int) -> dict[str, Any]:
    """A run's settings as its folder's config.json records them: the attack's own
    description (``attack.describe()``), the budget, the victim's shape and the defences."""
    described = {
        **attack.describe(),
        "budget": int(budget),
        "input_shape": list(oracle.input_shape),
        "num_classes": oracle.num_classes,
    }
    # A defended service answers differently: a run is resumed only under the same defences.
    defenses = getattr(oracle, "defenses", None)
    if defenses:
        described["defenses"] = [d.spec() for d in defenses]
    return described


def changed_settings(folder: RunFolder, described: dict[str, Any]) -> list[str]:
    """How `described` differs from the settings a run folder was started with.

    A setting the folder does not record (a run from a version without that option) counts
    as changed, its value then being unknown, unless it is one added since with the value
    that every run had before it existed (:data:`SETTINGS_ADDED_SINCE`).
    """
    before = folder.read_config()
    now = json.loads(json.dumps(described, default=str))
    resumable = RESUMABLE_CHANGES - ({"device"} if now.get("on_device") else set())
    changed = [
        f"{key}: {before[key]!r} then, {value!r} now"
        if key in before
        else f"{key}: not recorded then, {value!r} now"
        for key, value in now.items()
        if key not in resumable
        and before.get(key, SETTINGS_ADDED_SINCE.get(key, _UNRECORDED)) != value
    ]
    # The CLI also writes an empty list (or null, for a service) when there was none.
    changed += [
        f"{key}: {before[key]!r} then, none now"
        for key in _RECORDED_WHEN_SET
        if before.get(key) and key not in now
    ]
    return changed


def check_same_settings(folder: RunFolder, described: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint with other settings: the result would mix two runs."""
    changed = changed_settings(folder, described)
    if changed:
        raise ValueError(
            f"resume: the run in {folder.path} was started with other settings "
            f"({'; '.join(changed)}); resume it with the same settings, or start a new run "
            "folder (the CLI's --force starts this one over)"
        )


def save_checkpoint(
    folder: RunFolder,
    attack: Recorded,
    iteration: int,
    spent: int,
    metrics: list[dict[str, Any]],
    t0: float,
    service_state: Callable[[], Any] | None,
) -> None:
    """The run's state after `iteration` steps and `spent` queries (the attack's state, and
    the in-process service's if given), and its evaluation rows so far."""
    state = {
        "iteration": iteration,
        "queries_spent": spent,
        "elapsed_s": time.time() - t0,
        "metrics": metrics,
        "attack": attack.state_dict(),
    }
    if service_state is not None:
        state["service"] = service_state()
    folder.save_checkpoint(state)
    folder.write_metrics(metrics)
