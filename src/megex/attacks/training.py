"""How an attack's models learn: the disagreement between clone and victim, the optimisers
and learning-rate schedules its config sets, and the clone's weight average."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import accel
from .config import AttackConfig

__all__ = [
    "LOG_EPS",
    "disagreement",
    "new_weight_average",
    "optimisers",
    "step_schedules",
    "update_weight_average",
    "victim_targets",
    "warmed_weight_average",
]

LOG_EPS = 1e-8


def victim_targets(probabilities: torch.Tensor) -> torch.Tensor:
    """DFME's "mean" logit recovery: log p - mean_k log p (defined up to a constant anyway)."""
    logp = probabilities.clamp_min(LOG_EPS).log()
    return logp - logp.mean(dim=1, keepdim=True)


def disagreement(
    clone_logits: torch.Tensor, probabilities: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-image distance between clone and victim: 'l1' on recovered logits, or 'kl'."""
    if loss == "l1":
        return (clone_logits - victim_targets(probabilities)).abs().mean(dim=1)
    p = probabilities.clamp_min(LOG_EPS)
    p = p / p.sum(dim=1, keepdim=True)
    return (p * (p.log() - F.log_softmax(clone_logits, dim=1))).sum(dim=1)


def optimisers(
    c: AttackConfig, clone: nn.Module, generator: nn.Module
) -> tuple[torch.optim.SGD, torch.optim.Adam]:
    """SGD with momentum for the clone, Adam for the generator, at the config's rates."""
    clone_lr, generator_lr = accel.scaled_learning_rates(c)
    clone_opt = torch.optim.SGD(
        clone.parameters(),
        lr=clone_lr,
        momentum=c.clone_momentum,
        weight_decay=c.clone_weight_decay,
    )
    generator_opt = torch.optim.Adam(generator.parameters(), lr=generator_lr)
    return clone_opt, generator_opt


def step_schedules(
    c: AttackConfig, iterations: int, *optimizers: torch.optim.Optimizer
) -> tuple[torch.optim.lr_scheduler.MultiStepLR, ...]:
    """One step schedule per optimiser over a run of `iterations` iterations: the rate times
    lr_gamma at each milestone (none for a constant schedule)."""
    milestones = sorted({max(1, int(m * iterations)) for m in c.lr_milestones})
    if c.lr_schedule == "constant":
        milestones = []
    return tuple(
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones, c.lr_gamma) for opt in optimizers
    )


def new_weight_average(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to hold its weight average, starting from its weights.

    Hand-written rather than torch.optim.swa_utils.AveragedModel: it starts from the clone's
    initial weights with a warm-up of the decay, and copies batch-norm statistics instead of
    averaging them (`update_weight_average`)."""
    return copy.deepcopy(model).requires_grad_(False)


def update_weight_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """Move `average`'s weights towards `model`'s by 1 - decay; copy its buffers (batch-norm
    statistics) as they are."""
    with torch.no_grad():
        for avg, cur in zip(average.parameters(), model.parameters()):
            avg.lerp_(cur, 1 - decay)
        for avg, cur in zip(average.buffers(), model.buffers()):
            avg.copy_(cur)


def warmed_weight_average(average: nn.Module, model: nn.Module, decay: float, updates: int) -> None:
    """One step of the clone's weight average after its `updates`-th update: the decay
    warms up from 0.1 towards `decay`, so that the average does not drag the random initial
    weights along."""
    update_weight_average(average, model, min(decay, (1 + updates) / (10 + updates)))
