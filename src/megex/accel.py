"""The attack loop near an accelerator's limit: the pieces behind the `speed` settings.

Each is off by default, so that a CPU run, and its results, are what they were:

- ``precision='bf16'``: the forward passes of the clone (training on answers, MEGEX's
  generator step) and of the generator run under bf16 autocast, with channels-last weights
  off the CPU (tensor cores want them); their outputs, the losses and the backward passes'
  results are float32. Kept in fp32, and why: the victim and its answers (the service's
  precision is not the attacker's to choose: an oracle ignores its caller's autocast); the
  query images (float32 at every public boundary); DFME's losses at its probe points, whose
  differences over a step of 1e-3 are below bf16's resolution (8 bits of mantissa: a
  relative step of 2^-8 = 0.004); the map-matching loss (a double backward); the weights
  and the optimisers' states.
- ``compile``: torch.compile of the clone's and the generator's forward passes; the
  map-matching loss (a double backward, which compiled graphs do not support) stays eager.
- ``on_device``: random draws, the replay buffer and the logged losses stay on the attacker's
  device, and queries go to an oracle that answers on that device without a copy to the
  host, so that an iteration queues its work without waiting for it. Waits left: the
  oracle's check of the images' values (once per request: bad images are refused before
  they are charged), SmoothGrad's noise (the service draws it on the host), a generator
  restart (once per period), and the evasive attackers, whose pool of padding is on the host.
- ``lr_scaling``: learning rates scaled with the batch, for runs at larger batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "REFERENCE_BATCH",
    "attacker_generator",
    "exact_fp32",
    "forward_pass",
    "logged",
    "same_device",
    "scaled_learning_rates",
    "uses_channels_last",
]

# DFME's batch: learning rates given for it are scaled from it.
REFERENCE_BATCH = 256


def forward_pass(function: Callable, config: Any) -> Callable:
    """`function` (a model's forward pass) as the speed settings run it: compiled with
    `config.compile`'s mode, under bf16 autocast with `config.precision`, and returning
    float32. Autocast wraps the forward pass alone, as it should: its cache of bf16 weights
    lives as long as an autocast region, so a region around optimiser steps would go on
    using the weights from before them."""
    if config.compile != "off":
        function = torch.compile(function, mode=config.compile)
    if config.precision != "bf16":
        return function
    device_type = torch.device(config.device).type

    def in_bf16(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = function(*args, **kwargs)
        return out.float()

    return in_bf16


def uses_channels_last(config: Any) -> bool | None:
    """Channels-last for the attacker's models: True with bf16 off the CPU; None leaves it to
    :func:`megex.models.fast_layout` (channels-last on a CPU, the default layout elsewhere)."""
    if config.precision == "bf16" and torch.device(config.device).type != "cpu":
        return True
    return None


def attacker_generator(config: Any) -> torch.Generator:
    """The attack's random generator, seeded: on its device with `on_device`, else the CPU's
    (whose draws are the same on every device, so a CPU and a GPU run draw alike)."""
    device = torch.device(config.device) if config.on_device else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=device).manual_seed(config.seed)


def logged(value: torch.Tensor, config: Any) -> float | torch.Tensor:
    """A loss to log: a float, or with `on_device` the detached tensor (read at evaluation
    time, when the loop waits for the device anyway)."""
    value = value.detach()
    return value if config.on_device else float(value)


def scaled_learning_rates(config: Any) -> tuple[float, float]:
    """(clone_lr, generator_lr) after `config.lr_scaling` for `config.batch_size`."""
    ratio = config.batch_size / REFERENCE_BATCH
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.lr_scaling]
    return config.clone_lr * factor, config.generator_lr * factor


def exact_fp32(device: str | torch.device) -> None:
    """Full fp32 matrix products on a CUDA device, as on a CPU. With TF32 (PyTorch's default
    for cuDNN convolutions) DFME's forward differences (eps 1e-3) drown in rounding and the
    maps lose bits; bf16 passes (`precision`) are unaffected."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one ('cuda' is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True

    def index(d: torch.device) -> int:
        return torch.cuda.current_device() if d.index is None else d.index

    return index(a) == index(b)
