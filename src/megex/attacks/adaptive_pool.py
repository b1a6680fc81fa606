"""The attacker with images that knows the defence in front of it: `knockoff-maps` with the
adaptations of :mod:`megex.attacks.adaptive` that apply to an attacker without a generator.

- `map_repeats`: each pool image is sent that many times in one request (each copy a
  query, counted by the oracle) and the answers averaged: undoes zero-mean noise;
- `map_scale='clone'`: each class's map is kept as a direction and, at every clone update,
  given the norm of the clone's own d log pS_k / dx for that image as the clone is then
  (for sign, quantised, sparse or coarse maps, whose magnitudes say little);
- `map_matching='cosine'`: the clone's input gradient is matched to the map by direction;
- `maps_of='predicted'`: maps of every class are read as the predicted class's map alone;
- `answers_as='labels'`: every answer is read as its top class alone (one-hot), against a
  defence that perturbs the probabilities around a label it keeps (reverse sigmoid).

MEGEX's fourth adaptation, the generator's zeroth-order fallback where maps are withheld,
has nothing to act on here: there is no generator, and a withheld (all-zero) map is already
left out of the map term as unknown. :func:`megex.attacks.adaptive.adapt_to` picks the
settings from the defences a service declares; :func:`megex.attacks.adaptive.
applicable_settings` keeps those this attacker has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..oracle import Answer
from .adaptive import (
    MAP_ERRORS,
    AnswersAsLabelsConfig,
    MapAdaptationsConfig,
    adaptations,
    adapted_answer,
    clone_map_norms,
    with_class_norms,
)
from .knockoff import KnockoffMaps, KnockoffMapsConfig

__all__ = ["AdaptiveKnockoffMaps", "AdaptiveKnockoffMapsConfig"]


@dataclass(frozen=True)
class AdaptiveKnockoffMapsConfig(AnswersAsLabelsConfig, MapAdaptationsConfig, KnockoffMapsConfig):
    pass


class AdaptiveKnockoffMaps(KnockoffMaps):
    name = "knockoff-maps-adaptive"
    config_class = AdaptiveKnockoffMapsConfig

    def iteration_cost(self) -> int:
        # Every image asks for a map: each is sent map_repeats times, each copy a query.
        return int(self.config.query_batch) * self.config.map_repeats

    def next_queries(self) -> torch.Tensor:
        images = super().next_queries()
        r = self.config.map_repeats
        # One copy of the whole batch after another, as adapted_answer averages them.
        return images.repeat(r, 1, 1, 1) if r > 1 else images

    def keep(self, x: torch.Tensor, answer: Answer) -> None:
        r = self.config.map_repeats
        super().keep(x[: x.shape[0] // r], adapted_answer(answer, self.config))

    def map_gradients(self, answer: Answer, x: torch.Tensor) -> torch.Tensor:
        dlogp = super().map_gradients(answer, x)
        if self.config.map_scale == "returned" or dlogp.dim() != 5:
            return dlogp
        # Only the direction is kept: unit norm per class. The store holds maps in float16,
        # where a sign map read as d log p_k (divided by p_k, down to 1e-8) would overflow;
        # clone_loss gives each class's map the clone's norm at every update.
        return with_class_norms(dlogp, torch.ones(dlogp.shape[:2]))

    def clone_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        maps = batch.get("maps")
        if (
            c.map_scale == "clone"
            and c.explanation_loss > 0
            and maps is not None
            and maps.dim() == 5
        ):
            # The clone's own norms as it is now: a clone equal to the victim matches the
            # maps exactly, whatever magnitudes the service's maps had lost.
            x, maps = batch["images"].to(c.device), maps.to(c.device)
            batch = {**batch, "maps": with_class_norms(maps, clone_map_norms(self.clone, x))}
        return super().clone_loss(batch)

    def map_error(self, grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MAP_ERRORS[self.config.map_matching](grad, target)

    def details(self) -> dict[str, Any]:
        return {**super().details(), "adaptation": adaptations(self.config)}
