"""DFME (Truong et al., CVPR 2021): the generator's gradient estimated with extra queries.

Forward differences in the generator's pre-tanh space along m random unit directions:
grad ~ (d / (m eps)) sum_j [L(x + eps u_j) - L(x)] u_j, costing m + 1 queries per image.
The estimator is three functions that the attack and measurements of it share
(:mod:`megex.experiments.gradient_alignment`): `random_directions`, `probe_points` and
`forward_difference_gradient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import accel
from ..oracle import Oracle
from .base import LOG_EPS, Attack, disagreement
from .config import COUNT, POSITIVE, AttackConfig, setting

__all__ = [
    "DFME",
    "DFMEConfig",
    "forward_difference_gradient",
    "probe_points",
    "random_directions",
]


@dataclass(frozen=True)
class DFMEConfig(AttackConfig):
    directions: int = setting(1, "random directions m per image (m + 1 queries)", COUNT, "dfme")
    epsilon: float = setting(1e-3, "forward-difference step in pre-tanh space", POSITIVE, "dfme")


def random_directions(
    n: int, m: int, dims: int, rng: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, m, dims) directions uniform on the unit sphere, drawn from `rng` (on its device)."""
    u = torch.randn(n, m, dims, generator=rng, device=rng.device).to(device)
    return u / u.norm(dim=2, keepdim=True)


def probe_points(base: torch.Tensor, u: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The m + 1 points queried per point of `base` (n, ...): each point, then the point moved
    by `epsilon` along each of its directions `u` (n, m, dims); shape ((m + 1) n, ...)."""
    n, dims = base.shape[0], base[0].numel()
    # reshape, not view: a channels-last batch of colour images (the generator's layout on a
    # CPU) is flattened in (C, H, W) order by a copy; a contiguous one is not copied.
    flat = base.reshape(n, 1, dims)
    shifted = flat + epsilon * u
    return torch.cat([flat, shifted], dim=1).view(-1, *base.shape[1:])


def forward_difference_gradient(
    losses: torch.Tensor, u: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """(n, dims) estimated gradients from the losses at the probe points ((m + 1) n values in
    `probe_points` order) and the directions `u` (n, m, dims)."""
    n, m, dims = u.shape
    losses = losses.view(n, m + 1)
    diffs = (losses[:, 1:] - losses[:, :1]).unsqueeze(2)  # (n, m, 1)
    return (dims / (m * epsilon)) * (diffs * u).sum(dim=1)


class DFME(Attack):
    name = "dfme"
    config_class = DFMEConfig

    def queries_per_generator_step(self) -> int:
        return self.config.directions + 1

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        c = self.config
        z = self.sample_latent(c.batch_size)
        pre, _ = self.generate(z)
        base = pre.detach()
        n, dims = base.shape[0], base[0].numel()
        u = random_directions(n, c.directions, dims, self.rng, base.device)
        images = self.to_query(probe_points(base, u, c.epsilon), z)
        answer = self.ask(oracle, images)
        # The clone itself, not clone_forward: fp32 whatever the precision, since the
        # differences are below bf16's resolution.
        with torch.no_grad():
            losses = disagreement(self.clone(images), answer.probabilities.to(base.device), c.loss)
            losses = self.disagreement_now() * losses
            if c.victim_confidence > 0:
                # The same queries estimate the gradient of the victim's log p of the class
                # the latent picks.
                k = answer.probabilities.shape[1]
                logp = answer.probabilities.to(base.device).clamp_min(LOG_EPS).log()
                targets = self.latent_classes(z, k).to(base.device)
                targets = targets.repeat_interleave(c.directions + 1)
                conf = logp[torch.arange(len(targets), device=base.device), targets]
                losses = losses + c.victim_confidence * conf
        losses = losses.view(n, c.directions + 1)
        grad = forward_difference_gradient(losses, u, c.epsilon)
        # Maximise the disagreement: descend on -L, entering through the pre-activation.
        objective = -(pre * grad.view_as(pre)).sum() / n
        if (c.class_balance or 0) > 0:
            # The clone is the attacker's own: this term has an exact gradient, no queries.
            clone_logits = self.clone_forward(self.to_query(pre, z))
            objective = objective - c.class_balance * self.balance_term(clone_logits)
        # Every one of the (m + 1) n answered images is a labelled example already paid for.
        probs = answer.probabilities.to(base.device)
        info = {"generator_loss": accel.logged(losses[:, 0].mean(), c)}
        return self.finish_generator_step(objective, images.detach(), probs, None, info)

    def details(self) -> dict[str, Any]:
        return {"gradient": f"zeroth-order, m={self.config.directions}, eps={self.config.epsilon}"}
