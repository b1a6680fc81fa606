"""Jacobian-based data set augmentation (Papernot et al., AsiaCCS 2017): start from the
attacker's images, then grow the set by stepping each answered image along the sign of a
gradient of its answered class's log-probability, and ask the service about the new images.

Round rho (after every pool image has been asked) adds, for every answer kept so far,
clip(x + lam_rho * sign(g(x)), 0, 1), with lam_rho = lam * (-1)^floor(rho / step_period)
(Papernot et al.'s periodic step size) and g(x) the gradient of log p_c at x for the class c
the victim answered:
- `jbda`: the clone's gradient (the published method: the clone stands in for the victim);
- `jbda-maps`: the victim's own gradient, read off the map that came with the answer (the
  clone's where that map is unknown); its clone also matches every map, as knockoff-maps'.
Rounds double the set; a run's budget ends a round wherever it falls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import COUNT, POSITIVE, Choice, setting
from .pool import PoolAttack, PoolAttackConfig, PoolMapsConfig, PoolMapsMixin

__all__ = ["JBDA", "JBDAConfig", "JBDAMaps", "JBDAMapsConfig"]


@dataclass(frozen=True)
class JBDAConfig(PoolAttackConfig):
    step_size: float = setting(
        0.1, "lam: the size of each augmentation step (images in [0, 1])", POSITIVE, "jbda"
    )
    step_period: int = setting(
        3, "tau: the step's sign flips every this many rounds", COUNT, "jbda"
    )
    # JBDA steps along the clone's gradient: its clone learns between rounds.
    training: str = setting(
        "streaming",
        "when the clone learns: JBDA's clone learns as the answers come ('streaming'), "
        "since each round steps along its gradient",
        Choice(("streaming",)),
        "optim",
    )


@dataclass(frozen=True)
class JBDAMapsConfig(PoolMapsConfig, JBDAConfig):
    # Its steps follow the victim's maps, but its clone too learns round by round.
    pass


class JBDA(PoolAttack):
    name = "jbda"
    config_class = JBDAConfig

    def setup_selection(self, iterations: int) -> None:
        order = torch.randperm(self.pool.shape[0], generator=self.rng)
        self.queue = self.pool[order]
        self.rounds = 0

    def next_queries(self) -> torch.Tensor:
        b = self.config.query_batch
        parts, have = [], 0
        while have < b:
            if self.queue.shape[0] == 0:
                self.queue = self._augment()
            take = self.queue[: b - have]
            self.queue = self.queue[take.shape[0] :]
            parts.append(take)
            have += take.shape[0]
        return torch.cat(parts)

    def _augment(self) -> torch.Tensor:
        """The next round's images: every answer kept so far, one step along its gradient."""
        c = self.config
        self.rounds += 1
        sign = -1.0 if ((self.rounds - 1) // c.step_period) % 2 else 1.0
        images = self.store.get("images")
        labels = self.store.get("probs").argmax(dim=1)
        steps = []
        for start in range(0, images.shape[0], 1024):
            end = start + 1024
            steps.append(self.direction(images[start:end], labels[start:end], start))
        moved = images + sign * c.step_size * torch.cat(steps).sign()
        return moved.clamp(0, 1)

    def direction(self, x: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
        """Where to step stored images x[i] (store rows start + i): the clone's gradient of
        log p of the victim's class."""
        return self.clone_gradient(x, labels)

    def clone_gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        was_training = self.clone.training
        self.clone.eval()
        x = x.to(self.config.device).requires_grad_(True)
        logp = F.log_softmax(self.clone(x), dim=1)
        picked = logp.gather(1, labels.to(x.device).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
        self.clone.train(was_training)
        return grad.detach().cpu()

    def selection_state(self) -> dict[str, Any]:
        return {"queue": self.queue, "rounds": self.rounds}

    def load_selection_state(self, state: dict[str, Any]) -> None:
        self.queue, self.rounds = state["queue"], int(state["rounds"])

    def details(self) -> dict[str, Any]:
        return {**super().details(), "augmentation_rounds": self.rounds}


class JBDAMaps(PoolMapsMixin, JBDA):
    name = "jbda-maps"
    config_class = JBDAMapsConfig

    def direction(self, x: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
        maps = self.store.get("maps")[start : start + x.shape[0]].float()
        if maps.dim() == 5:
            maps = maps[torch.arange(x.shape[0]), labels]
        else:
            # A map of one class: the victim's gradient where it explains the answered class.
            explained = self.store.get("classes")[start : start + x.shape[0]]
            maps = maps * (explained == labels).view(-1, 1, 1, 1)
        unknown = maps.flatten(1).eq(0).all(dim=1)
        if bool(unknown.any()):
            maps[unknown] = self.clone_gradient(x[unknown], labels[unknown])
        return maps
