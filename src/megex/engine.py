"""The loop around an attack: budget, compute per query, evaluation, checkpoints, resume.

``run(attack, oracle, budget)`` calls ``attack.step(oracle)`` until the next step would
pass the budget. Queries are read off the oracle's own count (through :class:`Metered`,
which also refuses a request past the run's budget), never summed by the loop. After each
step the attack is allotted its clone updates for the queries spent so far
(``clone_updates_per_1k_queries``): the updates its fresh answers did not already give are
replayed from stored answers, so every method gets the same number of clone updates per
query whatever a step costs. The loop evaluates the clone every `eval_every` queries and at
the `eval_at` marks, checkpoints a run folder at each evaluation, draws a progress bar,
and continues a checkpoint exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks.base import Attack
from .attacks.config import AttackConfig
from .oracle import Answer, BudgetExceeded, Oracle, OracleView
from .runs import RunFolder
from .stop_signals import handled_stop_signals

__all__ = ["AttackResult", "Metered", "changed_settings", "describe_run", "run"]


@dataclass
class AttackResult:
    """What a run gives: the final figures, every evaluation row, and the clone."""

    method: str
    queries_used: int
    clone_accuracy: float | None
    fidelity: float | None
    elapsed_s: float
    iterations: int
    clone_updates: int = 0
    generator_updates: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    clone: nn.Module | None = field(default=None, repr=False)
    finished: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("clone")
        return out


class Metered(OracleView):
    """The oracle as one run sees it: queries counted from the run's start, by the oracle.

    A request that would pass the run's budget is refused whole before it reaches the
    oracle; everything else is the oracle's own answer and count.
    """

    def __init__(self, oracle: Oracle, budget: int, already_spent: int = 0):
        super().__init__(oracle)
        self.budget = int(budget)
        self._start = int(oracle.queries_used) - int(already_spent)

    @property
    def queries_used(self) -> int:
        return int(self.oracle.queries_used) - self._start

    @property
    def remaining(self) -> int | float:
        return min(self.budget - self.queries_used, self.oracle.remaining)

    @property
    def query_device(self) -> str:
        """The wrapped oracle's (megex.accel: queries sent without a copy to the host)."""
        return getattr(self.oracle, "query_device", "cpu")

    def query(self, x: torch.Tensor, explanation: Any = None) -> Answer:
        n = int(x.shape[0])
        left = self.budget - self.queries_used
        if n > left:
            raise BudgetExceeded(n, left, self.budget)
        return self.oracle.query(x, explanation=explanation)


def run(
    attack: Attack,
    oracle: Oracle,
    budget: int | None = None,
    *,
    evaluator: Any = None,
    eval_every: int | None = None,
    eval_at: Any = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Any = None,
    service_state: Any = None,
) -> AttackResult:
    """Attack `oracle` with at most `budget` queries (default: all it has left).

    evaluator: called as evaluator(clone) -> {"clone_accuracy", "fidelity", ...} every
    `eval_every` queries (default: a tenth of the budget) and at the end.
    eval_at: query counts at which to evaluate as well: after the last step that stays
    within each (so a run of budget B reports what a run of budget b < B would, when the
    schedule does not depend on the budget: lr_schedule='constant').
    run_dir: a run folder for config, metrics, checkpoints, clone and result; with
    resume=True an existing checkpoint there is continued exactly.
    callback: called as callback(iterations_done, queries_spent) after every step.
    service_state: a callable returning the in-process service's state, stored in the
    checkpoint (so that a resumed LocalOracle continues its ledger).
    """
    folder = RunFolder(run_dir) if run_dir is not None else None
    if budget is None and resume and folder is not None and folder.config_path.is_file():
        # A resumed run keeps the budget it started with, not what the oracle has left.
        budget = folder.read_config().get("budget")
    if budget is None:
        if not math.isfinite(oracle.remaining):
            raise ValueError("budget: the oracle has no budget of its own; pass budget=...")
        budget = int(oracle.remaining)
    if isinstance(budget, bool) or int(budget) != budget or int(budget) < 1:
        raise ValueError(f"budget: expected a whole number >= 1, got {budget!r}")
    budget = int(budget)
    cost = attack.iteration_cost()
    iterations = budget // cost
    if iterations < 1:
        c = attack.config
        raise ValueError(
            f"budget: {budget} queries is less than one iteration of {attack.name} "
            f"({cost} = batch {c.batch_size} x (generator steps x "
            f"{attack.queries_per_generator_step()} + {c.clone_steps} clone steps)); "
            "raise the budget or lower batch_size"
        )
    eval_every = int(eval_every or max(cost, budget // 10))
    attack.setup(oracle, iterations)
    described = describe_run(attack, oracle, budget)
    start_iteration, spent, metrics, elapsed0 = 0, 0, [], 0.0
    resuming = folder is not None and resume and folder.has_checkpoint()
    if folder is not None:
        folder.create()
    if resuming:
        check_same_settings(folder, described)
        state = folder.load_checkpoint()
        attack.load_state_dict(state["attack"])
        start_iteration, spent = state["iteration"], state["queries_spent"]
        metrics, elapsed0 = list(state["metrics"]), state["elapsed_s"]
    if folder is not None:
        folder.write_config(described)
    metered = Metered(oracle, budget, already_spent=spent)
    rate = float(attack.config.clone_updates_per_1k_queries)
    next_eval = (spent // eval_every + 1) * eval_every
    marks = sorted(int(b) for b in (eval_at or ()) if int(b) >= cost)
    t0 = time.time() - elapsed0
    bar = _progress_bar(budget, spent, progress, attack.name)
    interrupted, stopped, done = False, None, start_iteration

    def evaluate(info: dict[str, Any]) -> dict[str, Any]:
        row = {
            "queries": metered.queries_used,
            "elapsed_s": round(time.time() - t0, 2),
            "clone_updates": attack.clone_updates,
            "generator_updates": attack.generator_updates,
            **evaluator(attack.eval_model()),
        }
        # Losses kept on the device (on_device) are read here, where the loop waits anyway.
        values = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in info.items()}
        row.update({k: round(v, 5) for k, v in values.items() if isinstance(v, float)})
        metrics.append(row)
        return row

    stop_at_boundary = False
    with _stop_requests(enabled=folder is not None) as stop:
        try:
            for iteration in range(start_iteration, iterations):
                if stop.is_set():
                    # SIGTERM or SIGHUP: stop between two steps, where the state is whole.
                    interrupted = stop_at_boundary = True
                    break
                if metered.remaining < cost:
                    stopped = (
                        f"the oracle had {oracle.remaining} queries left, less than one iteration"
                    )
                    break
                before = metered.queries_used
                info = attack.step(metered)
                spent = metered.queries_used
                # The clone updates this many queries pay for, whatever kind the step made.
                owed = int(rate * spent / 1000) - attack.clone_updates if rate > 0 else 0
                if owed > 0:
                    loss = attack.replay(owed)
                    if loss is not None:
                        info["replay_loss"] = loss
                attack.end_iteration()
                if bar is not None:
                    bar.update(spent - before)
                last = iteration + 1 == iterations
                marked = any(spent <= b < spent + cost for b in marks)
                if evaluator is not None and (spent >= next_eval or last or marked):
                    row = evaluate(info)
                    next_eval = (spent // eval_every + 1) * eval_every
                    if bar is not None:
                        bar.set_postfix(acc=f"{row['clone_accuracy']:.3f}")
                    if folder is not None:
                        _checkpoint(
                            folder, attack, iteration + 1, spent, metrics, t0, service_state
                        )
                done = iteration + 1
                if callback is not None:
                    callback(done, spent)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
    spent = metered.queries_used
    if (
        stopped
        and evaluator is not None
        and spent
        and (not metrics or metrics[-1]["queries"] != spent)
    ):
        # Stopped early: the clone as it is at the end still gets its evaluation.
        evaluate({})
    elapsed = time.time() - t0
    # After Ctrl-C the checkpoint of the last evaluation stands: a half-done step cannot be
    # resumed exactly, so it is not saved. A stop between two steps is saved where it is.
    if folder is not None and (not interrupted or stop_at_boundary):
        _checkpoint(folder, attack, done, spent, metrics, t0, service_state)
    final = metrics[-1] if metrics else {}
    result = AttackResult(
        method=attack.name,
        queries_used=spent,
        clone_accuracy=final.get("clone_accuracy"),
        fidelity=final.get("fidelity"),
        elapsed_s=round(elapsed, 2),
        iterations=done,
        clone_updates=attack.clone_updates,
        generator_updates=attack.generator_updates,
        metrics=metrics,
        details={
            **attack.details(),
            "clone_arch": attack.clone_arch,
            "budget": budget,
            **({"stopped_early": stopped} if stopped else {}),
        },
        clone=attack.eval_model(),
        finished=not interrupted,
    )
    if folder is not None and not interrupted:
        folder.save_clone(
            attack.eval_model(),
            {
                "arch": attack.clone_arch,
                "input_shape": list(oracle.input_shape),
                "num_classes": oracle.num_classes,
            },
        )
        folder.write_result(result.to_dict())
    return result


@contextlib.contextmanager
def _stop_requests(enabled: bool) -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGHUP set while a run that has a folder goes on, so that
    the run stops at the end of its current step and saves a checkpoint there, rather than
    die and lose every step since its last evaluation. Off elsewhere (no folder, or not the
    main thread, where handlers cannot be set): those signals keep their usual effect."""
    event = threading.Event()
    if not enabled:
        yield event
        return
    with handled_stop_signals(lambda signum, frame: event.set()):
        yield event


def describe_run(attack: Attack, oracle: Oracle, budget: int) -> dict[str, Any]:
    """A run's settings as its folder's config.json records them."""
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


def _checkpoint(folder, attack, iteration, spent, metrics, t0, service_state) -> None:
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


# Settings that may differ between an interrupted run and its resumption (they change speed
# and float rounding, not what the run does); the device only while the attack's random
# generator is on the host (on_device keeps it on the device, whose state does not transfer).
_RESUMABLE_CHANGES = {"device", "compile"}
# Settings added after runs were recorded without them, with the value those runs had:
# the speed settings' defaults.
_ADDED_SETTINGS = {
    f.name: f.default for f in dataclasses.fields(AttackConfig) if f.metadata["group"] == "speed"
}


def changed_settings(folder: RunFolder, described: dict[str, Any]) -> list[str]:
    """How `described` differs from the settings a run folder was started with.

    A setting the folder does not record (a run from a version without that option) counts
    as changed, its value then being unknown, unless it is one added since with the value
    that every run had before it existed (the speed settings' defaults).
    """
    before = folder.read_config()
    now = json.loads(json.dumps(described, default=str))
    resumable = _RESUMABLE_CHANGES - ({"device"} if now.get("on_device") else set())
    changed = [
        f"{key}: {before[key]!r} then, {value!r} now"
        if key in before
        else f"{key}: not recorded then, {value!r} now"
        for key, value in now.items()
        if key not in resumable and before.get(key, _ADDED_SETTINGS.get(key, _UNRECORDED)) != value
    ]
    # Recorded only when set (describe_run): a run made behind a defence is not one without.
    # The CLI also writes an empty list (or null, for a service) when there was none.
    changed += [
        f"{key}: {before[key]!r} then, none now"
        for key in _RECORDED_WHEN_SET
        if before.get(key) and key not in now
    ]
    return changed


_UNRECORDED = object()
_RECORDED_WHEN_SET = ("defenses",)


def check_same_settings(folder: RunFolder, described: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint with other settings: the result would mix two runs."""
    changed = changed_settings(folder, described)
    if changed:
        raise ValueError(
            f"resume: the run in {folder.path} was started with other settings "
            f"({'; '.join(changed)}); resume it with the same settings, or start a new run "
            "folder (the CLI's --force starts this one over)"
        )


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", unit_scale=True, leave=False)
