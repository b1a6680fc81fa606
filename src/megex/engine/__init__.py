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

- :mod:`.protocol`: what the loop needs of an attack (:class:`Attack`); the attacks
  (:mod:`megex.attacks`) provide it, and the engine imports nothing of theirs.
- :mod:`.loop`: :func:`run`, the loop itself, a few lines of named steps.
- :mod:`.steps`: those steps (budget check, attack step, evaluation at marks,
  checkpoint, result), :class:`Metered` and :class:`AttackResult`.
- :mod:`.resume`: what a run folder records so that a run can be continued exactly.
"""

from .loop import run
from .protocol import Attack, Evaluator, LoopSettings
from .resume import changed_settings, check_same_settings, describe_run
from .steps import AttackResult, Metered, step_cost

__all__ = [
    "Attack",
    "AttackResult",
    "Evaluator",
    "LoopSettings",
    "Metered",
    "changed_settings",
    "check_same_settings",
    "describe_run",
    "run",
    "step_cost",
]
