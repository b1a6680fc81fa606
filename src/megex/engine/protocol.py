"""What the loop needs of an attack: a small protocol, which the attacks
(:class:`megex.attacks.base.Attack`) provide. The engine reads an attack only through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from ..oracle import Oracle

__all__ = ["Attack", "Evaluator", "LoopSettings"]

# Called with the clone to evaluate: {"clone_accuracy": ..., "fidelity": ..., ...}.
Evaluator = Callable[[nn.Module], dict[str, Any]]


class LoopSettings(Protocol):
    """The attack settings the loop reads."""

    @property
    def batch_size(self) -> int: ...

    @property
    def clone_steps(self) -> int: ...

    @property
    def clone_updates_per_1k_queries(self) -> float: ...


class Attack(Protocol):
    """What the loop needs of an attack (:class:`megex.attacks.base.Attack` provides it).

    ``setup`` is called once before the first step, and ``clone_arch`` is read after it.
    ``step`` spends queries only through the oracle it is given; ``replay(n)`` makes n clone
    updates on stored answers (no queries) and returns the last loss, if any;
    ``end_iteration`` advances schedules. ``describe`` gives the settings a run folder
    records, ``details`` what the result reports, ``state_dict``/``load_state_dict``
    everything a resumed run needs, ``eval_model`` the clone that is evaluated.
    """

    name: str
    clone_arch: str
    clone_updates: int
    generator_updates: int

    @property
    def config(self) -> LoopSettings: ...

    def iteration_cost(self) -> int: ...

    def queries_per_generator_step(self) -> int: ...

    def setup(self, oracle: Oracle, iterations: int) -> None: ...

    def step(self, oracle: Oracle) -> dict[str, Any]: ...

    def replay(self, updates: int) -> float | None: ...

    def end_iteration(self) -> None: ...

    def eval_model(self) -> nn.Module: ...

    def details(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
