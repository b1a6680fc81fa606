"""Victims made from the session's digits victim, for tests that need other answers, and an
untrained one for tests of an attack's pieces."""

from __future__ import annotations

import copy

import torch
from torch import nn

import megex


class _ScaledLogits(nn.Module):
    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def scaled_digits_victim(model: nn.Module, factor: float) -> megex.Victim:
    """A copy of a digits model (1x8x8, 10 classes) with its logits times `factor`: above 1
    sharper (some classes fall below p = 1e-8), below 1 softer (none come near it)."""
    module = _ScaledLogits(copy.deepcopy(model), factor)
    return megex.Victim.from_module(module, (1, 8, 8), 10).eval()


def untrained_8x8_victim() -> megex.Victim:
    """A small untrained victim (1x8x8, 10 classes, a seeded two-layer perceptron): answers
    and gradients for unit tests of an attack's pieces, in milliseconds."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )
    return megex.Victim.from_module(module, (1, 8, 8), 10, mean=0.5, std=0.5)
