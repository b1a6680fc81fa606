"""The loop: budget check, attack step, evaluation at marks, checkpoint, stop signal,
result (each step named in :mod:`.steps`)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..oracle import Oracle
from ..runs import RunFolder
from ..stop_signals import handled_stop_signals
from .protocol import Attack, Evaluator
from .steps import AttackResult, RunSteps

__all__ = ["run"]


def run(
    attack: Attack,
    oracle: Oracle,
    budget: int | None = None,
    *,
    evaluator: Evaluator | None = None,
    eval_every: int | None = None,
    eval_at: Iterable[int] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, int], Any] | None = None,
    service_state: Callable[[], Any] | None = None,
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
    budget = _budget(budget, oracle, folder, resume)
    loop = RunSteps.start(attack, oracle, budget, folder, resume, evaluator, eval_every, eval_at)
    loop.service_state = service_state
    with _stop_requests(enabled=folder is not None) as stop, loop.progress_bar(progress):
        try:
            for iteration in range(loop.done, loop.iterations):
                if stop.is_set():  # SIGTERM or SIGHUP: stop between two steps, state whole
                    loop.interrupted = loop.stopped_between_steps = True
                    break
                if not loop.budget_allows_a_step():
                    break
                info = loop.attack_step()
                if loop.evaluation_due(iteration):
                    loop.evaluate_and_checkpoint(info, iteration + 1)
                loop.done = iteration + 1
                if callback is not None:
                    callback(loop.done, loop.spent)
        except KeyboardInterrupt:
            loop.interrupted = True
    loop.evaluate_if_stopped_early()
    elapsed = time.time() - loop.t0
    loop.checkpoint_at_end()
    result = loop.result(elapsed)
    if stop.is_set() and not loop.stopped_between_steps:
        # The request came during the run's last step: the run finished and is saved. It is
        # passed on to whatever handles the signal outside the run (a sweep's driver, or the
        # default: the process ends) rather than lost, so that a job of many runs stops.
        signal.raise_signal(stop.signum)
    return result


def _budget(budget: int | None, oracle: Oracle, folder: RunFolder | None, resume: bool) -> int:
    """The run's budget: as given; a resumed run's own; else all the oracle has left."""
    if budget is None and resume and folder is not None and folder.config_path.is_file():
        # A resumed run keeps the budget it started with, not what the oracle has left.
        budget = folder.read_config().get("budget")
    if budget is None:
        if not math.isfinite(oracle.remaining):
            raise ValueError("budget: the oracle has no budget of its own; pass budget=...")
        budget = int(oracle.remaining)
    if isinstance(budget, bool) or int(budget) != budget or int(budget) < 1:
        raise ValueError(f"budget: expected a whole number >= 1, got {budget!r}")
    return int(budget)


@contextlib.contextmanager
def _stop_requests(enabled: bool) -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGHUP set while a run that has a folder goes on, so that
    the run stops at the end of its current step and saves a checkpoint there, rather than
    die and lose every step since its last evaluation. Off elsewhere (no folder, or not the
    main thread, where handlers cannot be set): those signals keep their usual effect."""
    event = _StopRequest()
    if not enabled:
        yield event
        return
    with handled_stop_signals(event.request):
        yield event


class _StopRequest(threading.Event):
    """A stop request, with the signal that made it."""

    signum: int = signal.SIGTERM

    def request(self, signum: int, frame: Any = None) -> None:
        self.signum = signum
        self.set()
