"""One run of mebench's DFME or DisGUIDE (caumin/model-extraction-benchmark, a checkout given
by ``--mebench``): ``mebench.attackers.dfme.DFME`` and, where the checkout has it,
``mebench.attackers.disguide.DisGUIDE``, each built with mebench's own ``BenchmarkState`` and
driven by its own ``run(ctx)`` through mebench's ``BenchmarkContext``.

What is adapted, only at the boundary, and recorded in the row's ``adapted`` list:

- the victim: mebench gets the victim's probabilities through an oracle object of its own
  interface (``query(x) -> OracleOutput``) that keeps mebench's ``BenchmarkState`` counts.
  mebench's DFME loop never ends once less than one batch is left (its steps all need whole
  batches), so the oracle reports nothing left then;
- the student: our clone for the victim's image size, in place of mebench's (its DFME builds
  its student with 3 input channels whatever the victim has): ``create_substitute`` is
  replaced in the attack's module. The generators are mebench's own;
- evaluation: on our test split in mebench's input convention, [0, 1], of the model mebench
  reports (its published substitute, or its student).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from megex.evaluate import Evaluator
from megex.models import build_classifier
from megex.victim import Victim

from .metering import BudgetReached, CountedVictim, QueryMeter, clone_scores, finished_peer_row
from .peer_imports import import_attack_module, import_from, peer_imports

ATTACK_CLASSES = {"dfme": "DFME", "disguide": "DisGUIDE"}
CORE_MODULES = ("state", "types", "context", "seed")


class _MebenchOracle:
    """Our counted victim behind mebench's oracle interface: ``query(x) -> OracleOutput``
    with probabilities, and the run's ``BenchmarkState`` counts kept as mebench's Oracle
    keeps them."""

    def __init__(self, counted: CountedVictim, state: Any, output_type: type, batch: int):
        self.model = counted
        self.state = state
        self.output_type = output_type
        self.batch = int(batch)
        self.input_shape = tuple(counted.victim.input_shape)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> Any:
        x = x.detach().cpu().reshape(int(x.shape[0]), *self.input_shape)
        probs = self.model(x).exp()
        meter = self.model.meter
        left = meter.budget - meter.count
        self.state.query_count = meter.count
        # mebench's DFME loop spins once less than a batch is left (every step needs one).
        self.state.budget_remaining = left if left >= self.batch else 0
        return self.output_type(kind="soft_prob", y=probs)


def mebench_config(method: str, budget: int, schedule: str) -> dict[str, Any]:
    """The config mebench's attack `method` is built with."""
    config: dict[str, Any] = {"name": method, "output_mode": "soft_prob", "max_budget": budget}
    if method == "disguide":
        # Their replay ring of 1M answers, as large as the budget: the same draws while
        # it never fills, without allocating a million images.
        config.update({"loss": "l1", "replay_size": min(1_000_000, budget)})
        if schedule == "constant":
            config["lr_decay_milestones_ratio"] = []
    return config


def _benchmark_state(
    state_module: types.ModuleType, victim: Victim, budget: int, clone_arch: str
) -> Any:
    """mebench's BenchmarkState for a data-free run on our victim."""
    c, h, _ = victim.input_shape
    k = victim.num_classes
    return state_module.BenchmarkState(
        budget_remaining=budget,
        metadata={
            "device": "cpu",
            "input_shape": (c, h, h),
            "num_classes": k,
            "max_budget": budget,
            "dataset_config": {"name": victim.dataset, "data_mode": "data_free"},
            "substitute_config": {"arch": clone_arch},
            "victim_config": {"channels": c, "num_classes": k, "output_mode": "soft_prob"},
        },
    )


def _run_attack(
    core: dict[str, types.ModuleType],
    attack_module: types.ModuleType,
    attack_cls: type,
    config: dict[str, Any],
    state: Any,
    counted: CountedVictim,
    our_clone: Callable[..., nn.Module],
    evaluator: Evaluator,
) -> tuple[float, str | None]:
    """Build the attack with our clone as its student and run it against our counted victim:
    (wall seconds, why it stopped short or None)."""
    with mock.patch.object(attack_module, "create_substitute", our_clone):
        attack = attack_cls(config, state)
    oracle = _MebenchOracle(counted, state, core["types"].OracleOutput, attack.batch_size)
    ctx = core["context"].BenchmarkContext(
        state=state, oracle=oracle, config={"budget": {"max_budget": config["max_budget"]}}
    )

    def evaluated() -> dict[str, Any]:
        published = state.attack_state.get("substitute")
        clone = published if published is not None else attack.student
        return clone_scores(clone, evaluator)

    counted.meter.evaluate = evaluated
    stopped = None
    start = time.perf_counter()
    try:
        attack.run(ctx)
    except BudgetReached as err:
        stopped = f"stopped at the budget: {err}"
    return time.perf_counter() - start, stopped


def _adapted(method: str, clone_arch: str, bypassed: str | None, stand_ins: list[str]) -> list[str]:
    adapted = [
        f"students: megex {clone_arch} (mebench.attackers.{method}.create_substitute replaced: "
        "the attack builds resnet18-8x, with 3 input channels in DFME)",
        "victim: our victim behind an oracle of mebench's interface (probabilities), "
        "counting every image; BenchmarkState kept by it, 0 left once under one batch",
        "evaluation: our test split in [0, 1] (mebench's contract)",
    ]
    if bypassed:
        adapted.append(bypassed)
    if stand_ins:
        adapted.append(f"not installed, empty stand-ins at import: {', '.join(stand_ins)}")
    return adapted


def run_mebench(
    folder: Path,
    method: str,
    victim: Victim,
    seed: int,
    budgets: list[int],
    evaluator: Evaluator,
    clone_arch: str,
    schedule: str,
    log: Any,
) -> dict[str, Any]:
    """mebench's DFME or DisGUIDE (`method`) to the largest budget, our victim its oracle."""
    budget = budgets[-1]
    c, h, _ = victim.input_shape
    k = victim.num_classes
    config = mebench_config(method, budget, schedule)

    def our_clone(*args: Any, **kwargs: Any) -> nn.Module:
        return build_classifier(clone_arch, k, c, h)

    with peer_imports(folder) as stand_ins:
        attack_module, bypassed = import_attack_module(folder, f"mebench.attackers.{method}")
        core = {name: import_from(folder, f"mebench.core.{name}") for name in CORE_MODULES}
        attack_cls = getattr(attack_module, ATTACK_CLASSES[method])
        core["seed"].set_seed(seed)
        state = _benchmark_state(core["state"], victim, budget, clone_arch)
        meter = QueryMeter(budget, budgets)
        counted = CountedVictim(victim, meter)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            wall_s, stopped = _run_attack(
                core, attack_module, attack_cls, config, state, counted, our_clone, evaluator
            )
        row = finished_peer_row(meter, counted, wall_s, stopped)
    return {
        **row,
        "peer_reported_queries": int(state.query_count),
        "settings": {
            **config,
            "class": f"mebench.attackers.{method}.{ATTACK_CLASSES[method]}",
        },
        "adapted": _adapted(method, clone_arch, bypassed, stand_ins),
    }
