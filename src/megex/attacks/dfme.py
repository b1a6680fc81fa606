"""DFME (Truong et al., CVPR 2021): the generator's gradient estimated with extra queries.

Forward differences in the generator's pre-tanh space along m random unit directions:
grad ~ (d / (m eps)) sum_j [L(x + eps u_j) - L(x)] u_j, costing m + 1 queries per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..oracle import Oracle
from .base import LOG_EPS, Attack, disagreement
from .config import COUNT, POSITIVE, AttackConfig, setting

__all__ = ["DFME", "DFMEConfig"]


@dataclass(frozen=True)
class DFMEConfig(AttackConfig):
    directions: int = setting(1, "random directions m per image (m + 1 queries)", COUNT, "dfme")
    epsilon: float = setting(1e-3, "forward-difference step in pre-tanh space", POSITIVE, "dfme")


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
        u = torch.randn(n, c.directions, dims, generator=self.rng).to(base.device)
        u = u / u.norm(dim=2, keepdim=True)
        shifted = base.view(n, 1, dims) + c.epsilon * u
        points = torch.cat([base.view(n, 1, dims), shifted], dim=1).view(-1, *base.shape[1:])
        images = self.to_query(points, z)
        answer = self.ask(oracle, images)
        with torch.no_grad():
            losses = disagreement(self.clone(images), answer.probabilities.to(base.device), c.loss)
            losses = self.disagreement_now() * losses
            if c.victim_confidence > 0:
                # The same queries estimate the gradient of the victim's log p of the class
                # the latent picks.
                k = answer.probabilities.shape[1]
                targets = self.latent_classes(z, k).cpu().repeat_interleave(c.directions + 1)
                logp = answer.probabilities.clamp_min(LOG_EPS).log()
                conf = logp[torch.arange(len(targets)), targets].to(base.device)
                losses = losses + c.victim_confidence * conf
        losses = losses.view(n, c.directions + 1)
        diffs = (losses[:, 1:] - losses[:, :1]).unsqueeze(2)  # (n, m, 1)
        grad = (dims / (c.directions * c.epsilon)) * (diffs * u).sum(dim=1)
        # Maximise the disagreement: descend on -L, entering through the pre-activation.
        objective = -(pre * grad.view_as(pre)).sum() / n
        if (c.class_balance or 0) > 0:
            # The clone is the attacker's own: this term has an exact gradient, no queries.
            clone_logits = self.clone(self.to_query(pre, z))
            objective = objective - c.class_balance * self.balance_term(clone_logits)
        # Every one of the (m + 1) n answered images is a labelled example already paid for.
        probs = answer.probabilities.to(base.device)
        info = {"generator_loss": float(losses[:, 0].mean())}
        return self.finish_generator_step(objective, images.detach(), probs, None, info)

    def details(self) -> dict[str, Any]:
        return {"gradient": f"zeroth-order, m={self.config.directions}, eps={self.config.epsilon}"}
