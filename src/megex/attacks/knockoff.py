"""Knockoff Nets (Orekondy et al., CVPR 2019) with ActiveThief's choices of queries (Pal et
al., AAAI 2020): send the attacker's own images, train the clone on the answers.

Which pool image goes next (`selection`):
- 'random': a seeded random order (Knockoff Nets' random strategy);
- 'uncertainty': the images the clone is least sure of (highest entropy of its prediction);
- 'kcenter': greedy k-center in the clone's probability space: each image the farthest
  from every image asked so far (ActiveThief's k-center).
The first request is random under every selection (the clone knows nothing yet); a choice
by the clone needs the clone to learn between requests (`training='streaming'`).
Once every pool image has been asked, further queries are mixup images (Zhang et al., 2018):
lam * a + (1 - lam) * b for two random pool images and lam ~ U(0, 1): new points between
the attacker's images, an augmentation of the pool that the run's results declare.

`knockoff-maps` asks for an explanation with every image and its clone also matches every
map (:class:`megex.attacks.pool.PoolMapsMixin`); one image is one query, map or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import Choice, SettingError, setting
from .pool import PoolAttack, PoolAttackConfig, PoolMapsConfig, PoolMapsMixin

__all__ = ["Knockoff", "KnockoffConfig", "KnockoffMaps", "KnockoffMapsConfig"]


@dataclass(frozen=True)
class KnockoffConfig(PoolAttackConfig):
    selection: str = setting(
        "random",
        "which pool image to ask next: 'random', 'uncertainty' (the clone's highest "
        "entropy) or 'kcenter' (farthest from those asked, in the clone's probabilities)",
        Choice(("random", "uncertainty", "kcenter")),
        "knockoff",
    )

    def check_combination(self) -> None:
        if self.selection != "random" and self.training != "streaming":
            raise SettingError(
                f"selection: {self.selection!r} chooses by the clone, which learns only after "
                "the queries with training 'after-queries'; set training to 'streaming'"
            )


@dataclass(frozen=True)
class KnockoffMapsConfig(PoolMapsConfig, KnockoffConfig):
    def check_combination(self) -> None:
        PoolMapsConfig.check_combination(self)
        KnockoffConfig.check_combination(self)


class Knockoff(PoolAttack):
    name = "knockoff"
    config_class = KnockoffConfig

    def setup_selection(self, iterations: int) -> None:
        n = self.pool.shape[0]
        self.order = torch.randperm(n, generator=self.rng)
        self.asked = torch.zeros(n, dtype=torch.bool)
        self.mixup_queries = 0

    def next_queries(self) -> torch.Tensor:
        b = self.config.query_batch
        left = int((~self.asked).sum())
        chosen = self._choose(min(b, left)) if left else torch.empty(0, dtype=torch.long)
        self.asked[chosen] = True
        images = self.pool[chosen]
        if len(chosen) < b:
            images = torch.cat([images, self._mixup(b - len(chosen))])
        return images

    def _choose(self, n: int) -> torch.Tensor:
        """Indices of `n` pool images not asked yet, by the selection setting."""
        selection = self.config.selection
        if selection == "random" or not bool(self.asked.any()):
            unasked = self.order[~self.asked[self.order]]
            return unasked[:n]
        candidates = torch.nonzero(~self.asked).view(-1)
        probs = self.clone_probabilities(self.pool[candidates])
        if selection == "uncertainty":
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
            return candidates[torch.topk(entropy, n).indices]
        centres = self.clone_probabilities(self.pool[self.asked])
        return candidates[_k_center(probs, centres, n)]

    def _mixup(self, n: int) -> torch.Tensor:
        size = self.pool.shape[0]
        a = torch.randint(0, size, (n,), generator=self.rng)
        b = torch.randint(0, size, (n,), generator=self.rng)
        lam = torch.rand(n, 1, 1, 1, generator=self.rng)
        self.mixup_queries += n
        return lam * self.pool[a] + (1 - lam) * self.pool[b]

    def selection_state(self) -> dict[str, Any]:
        return {"order": self.order, "asked": self.asked, "mixup_queries": self.mixup_queries}

    def load_selection_state(self, state: dict[str, Any]) -> None:
        self.order, self.asked = state["order"], state["asked"]
        self.mixup_queries = int(state["mixup_queries"])

    def details(self) -> dict[str, Any]:
        return {
            **super().details(),
            "pool_images_asked": int(self.asked.sum()),
            "mixup_queries": self.mixup_queries,
        }


class KnockoffMaps(PoolMapsMixin, Knockoff):
    name = "knockoff-maps"
    config_class = KnockoffMapsConfig


def _k_center(points: torch.Tensor, centres: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy k-center: `n` rows of `points`, each the farthest (Euclidean) from `centres`
    and from the rows chosen before it."""
    nearest = torch.cdist(points, centres).min(dim=1).values
    chosen = []
    for _ in range(n):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, torch.cdist(points, points[i : i + 1]).view(-1))
        nearest[i] = -1.0
    return torch.tensor(chosen, dtype=torch.long)
