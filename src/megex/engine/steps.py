"""The named steps of the loop in :func:`megex.engine.run`: the budget check, the attack
step with the clone updates its queries pay for, evaluation at marks, checkpoints and the
result; and :class:`Metered`, the oracle as one run sees it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..oracle import Answer, BudgetExceeded, Oracle, OracleView
from ..runs import RunFolder
from .protocol import Attack, Evaluator
from .resume import check_same_settings, describe_run, save_checkpoint

__all__ = ["AttackResult", "Metered", "RunSteps"]


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


@dataclass
class RunSteps:
    """One run's state between steps, and the named steps of the loop in
    :func:`megex.engine.run`."""

    attack: Attack
    oracle: Oracle
    metered: Metered
    folder: RunFolder | None
    budget: int
    cost: int
    iterations: int
    evaluator: Evaluator | None
    eval_every: int
    marks: list[int]
    done: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    service_state: Callable[[], Any] | None = None
    bar: Any = None
    next_eval: int = 0
    stopped: str | None = None
    interrupted: bool = False
    stopped_between_steps: bool = False

    @classmethod
    def start(
        cls,
        attack: Attack,
        oracle: Oracle,
        budget: int,
        folder: RunFolder | None,
        resume: bool,
        evaluator: Evaluator | None,
        eval_every: int | None,
        eval_at: Iterable[int] | None,
    ) -> RunSteps:
        """Set the attack up, restore a checkpoint when resuming, record the settings."""
        cost = attack.iteration_cost()
        iterations = _iterations(attack, budget, cost)
        every = int(eval_every or max(cost, budget // 10))
        attack.setup(oracle, iterations)
        described = describe_run(attack, oracle, budget)
        done, spent, metrics, elapsed = 0, 0, [], 0.0
        if folder is not None:
            folder.create()
            if resume and folder.has_checkpoint():
                check_same_settings(folder, described)
                state = folder.load_checkpoint()
                attack.load_state_dict(state["attack"])
                done, spent = state["iteration"], state["queries_spent"]
                metrics, elapsed = list(state["metrics"]), state["elapsed_s"]
            folder.write_config(described)
        marks = sorted(int(b) for b in (eval_at or ()) if int(b) >= cost)
        loop = cls(
            attack,
            oracle,
            Metered(oracle, budget, already_spent=spent),
            folder,
            budget,
            cost,
            iterations,
            evaluator,
            every,
            marks,
            done=done,
            metrics=metrics,
            next_eval=(spent // every + 1) * every,
        )
        loop.t0 = time.time() - elapsed
        return loop

    @property
    def spent(self) -> int:
        """Queries spent by the run so far, as the oracle counts them."""
        return self.metered.queries_used

    @contextlib.contextmanager
    def progress_bar(self, enabled: bool) -> Iterator[None]:
        """A progress bar of queries spent, for the length of the block (when enabled)."""
        self.bar = _progress_bar(self.budget, self.spent, enabled, self.attack.name)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()

    def budget_allows_a_step(self) -> bool:
        """Whether one more step fits the run's budget and what the oracle has left."""
        if self.metered.remaining < self.cost:
            self.stopped = (
                f"the oracle had {self.oracle.remaining} queries left, less than one iteration"
            )
            return False
        return True

    def attack_step(self) -> dict[str, Any]:
        """One step of the attack, then the clone updates its queries pay for."""
        before = self.spent
        info = self.attack.step(self.metered)
        spent = self.spent
        # The clone updates this many queries pay for, whatever kind the step made.
        rate = float(self.attack.config.clone_updates_per_1k_queries)
        owed = int(rate * spent / 1000) - self.attack.clone_updates if rate > 0 else 0
        if owed > 0:
            loss = self.attack.replay(owed)
            if loss is not None:
                info["replay_loss"] = loss
        self.attack.end_iteration()
        if self.bar is not None:
            self.bar.update(spent - before)
        return info

    def evaluation_due(self, iteration: int) -> bool:
        """Whether the clone is evaluated after step `iteration`: every `eval_every`
        queries, at the last step, and at the last step within each mark."""
        if self.evaluator is None:
            return False
        spent, cost = self.spent, self.cost
        last = iteration + 1 == self.iterations
        marked = any(spent <= b < spent + cost for b in self.marks)
        return spent >= self.next_eval or last or marked

    def evaluate_and_checkpoint(self, info: dict[str, Any], iterations_done: int) -> None:
        row = self.evaluate(info)
        self.next_eval = (self.spent // self.eval_every + 1) * self.eval_every
        if self.bar is not None:
            self.bar.set_postfix(acc=f"{row['clone_accuracy']:.3f}")
        if self.folder is not None:
            self.checkpoint(iterations_done)

    def evaluate(self, info: dict[str, Any]) -> dict[str, Any]:
        """One evaluation row: queries, time, updates, the evaluator's figures, the losses."""
        attack = self.attack
        row = {
            "queries": self.spent,
            "elapsed_s": round(time.time() - self.t0, 2),
            "clone_updates": attack.clone_updates,
            "generator_updates": attack.generator_updates,
            **self.evaluator(attack.eval_model()),
        }
        # Losses kept on the device (on_device) are read here, where the loop waits anyway.
        values = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in info.items()}
        row.update({k: round(v, 5) for k, v in values.items() if isinstance(v, float)})
        self.metrics.append(row)
        return row

    def checkpoint(self, iterations_done: int) -> None:
        save_checkpoint(
            self.folder,
            self.attack,
            iterations_done,
            self.spent,
            self.metrics,
            self.t0,
            self.service_state,
        )

    def evaluate_if_stopped_early(self) -> None:
        """Stopped early: the clone as it is at the end still gets its evaluation."""
        spent = self.spent
        last = self.metrics[-1]["queries"] if self.metrics else None
        if self.stopped and self.evaluator is not None and spent and last != spent:
            self.evaluate({})

    def checkpoint_at_end(self) -> None:
        # After Ctrl-C the checkpoint of the last evaluation stands: a half-done step cannot
        # be resumed exactly, so it is not saved. A stop between two steps is saved there.
        if self.folder is not None and (not self.interrupted or self.stopped_between_steps):
            self.checkpoint(self.done)

    def result(self, elapsed: float) -> AttackResult:
        """The result; a finished run's folder also gets the clone and result.json."""
        attack, final = self.attack, self.metrics[-1] if self.metrics else {}
        result = AttackResult(
            method=attack.name,
            queries_used=self.spent,
            clone_accuracy=final.get("clone_accuracy"),
            fidelity=final.get("fidelity"),
            elapsed_s=round(elapsed, 2),
            iterations=self.done,
            clone_updates=attack.clone_updates,
            generator_updates=attack.generator_updates,
            metrics=self.metrics,
            details={
                **attack.details(),
                "clone_arch": attack.clone_arch,
                "budget": self.budget,
                **({"stopped_early": self.stopped} if self.stopped else {}),
            },
            clone=attack.eval_model(),
            finished=not self.interrupted,
        )
        if self.folder is not None and not self.interrupted:
            described = {
                "arch": attack.clone_arch,
                "input_shape": list(self.oracle.input_shape),
                "num_classes": self.oracle.num_classes,
            }
            self.folder.save_clone(attack.eval_model(), described)
            self.folder.write_result(result.to_dict())
        return result


def _iterations(attack: Attack, budget: int, cost: int) -> int:
    """Whole steps of `cost` queries within `budget`, or ValueError when not even one fits."""
    iterations = budget // cost
    if iterations < 1:
        made_of, setting = step_cost(attack)
        raise ValueError(
            f"budget: {budget} queries is less than one iteration of {attack.name} "
            f"({cost} = {made_of}); raise the budget or lower {setting}"
        )
    return iterations


def step_cost(attack: Attack) -> tuple[str, str]:
    """What one iteration's queries are made of, and the setting that lowers them: the
    words of every "budget below one iteration" message (engine and CLI alike)."""
    c = attack.config
    if not hasattr(c, "query_batch"):
        made_of = (
            f"batch {c.batch_size} x (generator steps x "
            f"{attack.queries_per_generator_step()} + {c.clone_steps} clone steps)"
        )
        return made_of, "batch_size"
    # An attack with images: one request of its own images per step.
    repeats = int(getattr(c, "map_repeats", 1))
    made_of = f"one request: query_batch {c.query_batch}" + (
        f" x map_repeats {repeats}" if repeats > 1 else ""
    )
    return made_of, "query_batch"


def _progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    # Imported here: core imports need only torch and numpy (a GPU machine runs src/ with
    # its own torch), and a run without a bar needs no tqdm.
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", unit_scale=True, leave=False)
