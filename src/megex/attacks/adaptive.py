"""An explanation attacker that knows the defence in front of it and adapts to it.

A defence is worth something only against an attacker who knows it is there: a noisy map
can be averaged, a sign map is still a direction, a service that zeroes all but the
predicted class's map still explains that class, probabilities perturbed around a label
the service keeps still give that label, and where the maps cannot steer the
generator at all the attacker can fall back to estimating the gradient from predictions
(DFME's forward differences) while its clone still learns from whatever the maps say.

`AdaptiveMEGEX` is MEGEX with those adaptations as settings, and :func:`adapt_to` chooses
them from the defences a service declares (by their names), with the rule for each written
next to it. The adaptations that only read maps (:class:`MapAdaptationsConfig`) are shared
with the attacker with images (:mod:`megex.attacks.adaptive_pool`), through the functions
here. The trade-off benchmark reports the naive and the adaptive attacker side by side;
a defence stops an attacker only if neither of the two stays ahead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..explain import Explanation, explain
from ..oracle import Answer, Oracle
from .config import COUNT, FLAG, POSITIVE, Choice, setting
from .dfme import DFME
from .maps import relative_map_error
from .megex import MEGEX, MEGEXConfig

__all__ = [
    "MAP_ERRORS",
    "AdaptiveMEGEX",
    "AdaptiveMEGEXConfig",
    "AnswersAsLabelsConfig",
    "MapAdaptationsConfig",
    "adapt_to",
    "adapted_answer",
    "adaptations",
    "answers_read",
    "applicable_settings",
    "averaged_answer",
    "clone_map_norms",
    "cosine_map_error",
    "predicted_class_only",
    "with_class_norms",
]


@dataclass(frozen=True)
class MapAdaptationsConfig:
    """The adaptations of any attacker that reads maps, with or without a generator (a
    mixin of the adaptive attackers' configs)."""

    map_repeats: int = setting(
        1,
        "send every image that asks for a map this many times and average the answers "
        "(each copy is a query): undoes zero-mean noise on the maps",
        COUNT,
        "adaptive",
    )
    map_scale: str = setting(
        "returned",
        "'returned': use the maps' magnitudes as they come; 'clone': give each class's map "
        "the norm of the clone's own d log p / dx for that class (and, with a generator, the "
        "victim's part of the generator's gradient, per image, the norm of the clone's part): "
        "for sign, quantised, sparse or coarse maps, whose magnitudes say little",
        Choice(("returned", "clone")),
        "adaptive",
    )
    map_matching: str = setting(
        "relative",
        "how the clone's input gradient is matched to a map: 'relative' squared error, or "
        "'cosine' (1 - cosine: direction only, for maps whose scale was changed)",
        Choice(("relative", "cosine")),
        "adaptive",
    )
    maps_of: str = setting(
        "returned",
        "'predicted': of maps for every class keep only the predicted class's (a service "
        "that zeroes the others), and use them as one class's map",
        Choice(("returned", "predicted")),
        "adaptive",
    )


@dataclass(frozen=True)
class AdaptiveMEGEXConfig(MapAdaptationsConfig, MEGEXConfig):
    generator_gradient: str = setting(
        "maps",
        "where the generator's gradient comes from: 'maps', or 'zeroth-order' (DFME's "
        "forward differences along `directions` random directions, step `epsilon`; m + 1 "
        "queries per image) when the maps cannot steer it; the clone still learns from maps",
        Choice(("maps", "zeroth-order")),
        "adaptive",
    )
    directions: int = setting(
        1, "zeroth-order fallback: random directions m per image", COUNT, "adaptive"
    )
    epsilon: float = setting(
        1e-3,
        "zeroth-order fallback: forward-difference step in pre-tanh space",
        POSITIVE,
        "adaptive",
    )


class AdaptiveMEGEX(MEGEX):
    name = "megex-adaptive"
    config_class = AdaptiveMEGEXConfig

    def queries_per_generator_step(self) -> int:
        c = self.config
        if c.generator_gradient == "zeroth-order":
            return c.directions + 1
        return c.map_repeats

    def iteration_cost(self) -> int:
        c = self.config
        per_clone_query = c.map_repeats if self.clone_query_explanation() else 1
        return c.batch_size * (
            c.generator_steps * self.queries_per_generator_step() + c.clone_steps * per_clone_query
        )

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        if self.config.generator_gradient == "zeroth-order":
            # DFME's step, on this attack's generator and clone; its answers carry no maps.
            return DFME.generator_step(self, oracle)
        return super().generator_step(oracle)

    def ask(self, oracle: Oracle, x: torch.Tensor, explanation: Any = None) -> Answer:
        c = self.config
        if explanation is None or explanation is False:
            return super().ask(oracle, x)
        r = c.map_repeats
        answer = super().ask(oracle, x.repeat(r, 1, 1, 1) if r > 1 else x, explanation)
        return adapted_answer(answer, c)

    def map_gradients(self, answer: Answer, x: torch.Tensor) -> torch.Tensor:
        dlogp = super().map_gradients(answer, x)
        if self.config.map_scale == "returned" or dlogp.dim() != 5:
            return dlogp
        # A sign, quantised or sparse map of every class has lost each class's magnitude,
        # and d log p_k divides class k's map by p_k: the least likely class would outweigh
        # the others by orders of magnitude (measured on sign maps: median ratio of the
        # largest to the smallest class's norm 2e6, against 2e2 for honest maps). Each
        # class's map is given the norm of the clone's own d log pS_k / dx, direction kept.
        return with_class_norms(dlogp, clone_map_norms(self.clone, x))

    def scale_victim_gradient(
        self, victim_grad: torch.Tensor, clone_term: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        if self.config.map_scale == "returned":
            return victim_grad
        # The clone's part of the same objective has its true scale: the victim's part is
        # given that norm per image, keeping its direction.
        (clone_grad,) = torch.autograd.grad(clone_term, x, retain_graph=True)
        dims = tuple(range(1, victim_grad.dim()))
        target = clone_grad.detach().flatten(1).norm(dim=1)
        norm = victim_grad.flatten(1).norm(dim=1)
        scale = torch.where(norm > 0, target / norm.clamp_min(1e-12), 0.0)
        return victim_grad * scale.view(-1, *([1] * len(dims)))

    def map_error(self, grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MAP_ERRORS[self.config.map_matching](grad, target)

    def details(self) -> dict[str, Any]:
        c = self.config
        out = super().details() if c.generator_gradient == "maps" else {}
        if c.generator_gradient == "zeroth-order":
            out["generator_gradient"] = f"zeroth-order, m={c.directions}, eps={c.epsilon}"
        out["adaptation"] = adaptations(c)
        return out


# --- what every adaptive attacker shares -------------------------------------------------


def adaptations(config: Any) -> dict[str, Any]:
    """The settings of group "adaptive" of a config, by name: what a run adapted, for its
    details."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("group") == "adaptive"
    }


def adapted_answer(answer: Answer, config: MapAdaptationsConfig) -> Answer:
    """An answer to `config.map_repeats` copies of each image, sent one copy after
    another, as the adaptive attacker reads it: the copies averaged, maps of every class
    read as the predicted class's where `maps_of` is 'predicted', and the probabilities as
    the label alone where `answers_as` is 'labels'."""
    if config.map_repeats > 1:
        answer = averaged_answer(answer, config.map_repeats)
    if config.maps_of == "predicted" and answer.explanation is not None:
        answer = predicted_class_only(answer)
    return answers_read(answer, config)


@dataclass(frozen=True)
class AnswersAsLabelsConfig:
    """The adaptation of the attacker with images to a defence of the probabilities (a mixin
    of its config). Not the data-free attacker's: behind `label-only` its generator learns
    less from labels (14.1% at 14x14) than from reverse sigmoid's probabilities (23.2%)."""

    answers_as: str = setting(
        "probabilities",
        "'labels': read every answer as its top class alone (one-hot), for a defence that "
        "perturbs the probabilities but keeps the label on top (reverse sigmoid): the "
        "label is all it leaves true, and the maps are then read with it",
        Choice(("probabilities", "labels")),
        "adaptive",
    )


def answers_read(answer: Answer, config: Any) -> Answer:
    """The answer's predictions as the attacker reads them: as they come, or (answers_as
    'labels') one-hot at the top class, with no logits, as a label-only service answers."""
    if getattr(config, "answers_as", "probabilities") != "labels":
        return answer
    one_hot = F.one_hot(answer.labels, answer.probabilities.shape[1])
    return dataclasses.replace(
        answer, probabilities=one_hot.to(answer.probabilities.dtype), logits=None
    )


def averaged_answer(answer: Answer, repeats: int) -> Answer:
    """The mean of `repeats` answers to the same images, sent one copy after another."""

    def mean(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.view(repeats, t.shape[0] // repeats, *t.shape[1:]).float().mean(dim=0)

    n = answer.labels.shape[0] // repeats
    return dataclasses.replace(
        answer,
        probabilities=mean(answer.probabilities),
        labels=answer.labels[:n],
        logits=mean(answer.logits),
        explanation=mean(answer.explanation),
    )


def predicted_class_only(answer: Answer) -> Answer:
    """An answer with maps of every class read as the predicted class's map alone."""
    spec = answer.explanation_spec
    maps = answer.explanation
    if spec is None or maps is None or maps.dim() != 5:
        return answer
    picked = maps[torch.arange(maps.shape[0]), answer.labels.to(torch.long)]
    one = Explanation(spec.method, target="predicted", output=spec.output, **spec.params)
    return dataclasses.replace(answer, explanation=picked, explanation_spec=one)


# The clone's own d log p_k / dx for every class (explained in eval mode, like the victim).
_CLONE_LOG_PROBABILITY_MAPS = Explanation("gradient", target="all", output="log_probability")


def clone_map_norms(clone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm of the clone's own d log pS_k / dx for every image and class, (N, K)."""
    own = explain(clone, x.detach(), _CLONE_LOG_PROBABILITY_MAPS)
    return own.flatten(2).norm(dim=2)


def with_class_norms(maps: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Maps of every class (N, K, C, H, W), each class's map given the norm `norms[n, k]`
    and its direction kept; an all-zero map (unknown) stays zero."""
    current = maps.flatten(2).norm(dim=2)
    scale = torch.where(current > 0, norms.to(maps.dtype) / current.clamp_min(1e-12), 0.0)
    return maps * scale.view(*scale.shape, 1, 1, 1)


def cosine_map_error(grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, 1 - the cosine between the clone's input gradient and the map's: the
    direction alone, for maps whose scale was changed."""
    return 1 - F.cosine_similarity(grad.flatten(1), target.flatten(1), dim=1, eps=1e-12)


# How the clone's input gradient is matched to a map, by the `map_matching` setting.
MAP_ERRORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relative": relative_map_error,
    "cosine": cosine_map_error,
}


# How each declared defence is met (keyed by the defence's name; a strength where it
# matters). Names that are not listed need no adaptation or have none that helps.
def adapt_to(defenses: Iterable[Any]) -> dict[str, Any]:
    """The adaptive settings for a service that applies `defenses` (:mod:`megex.defenses`
    objects, or dicts of a "name" and the parameters), combined in order.

    - noise (Gaussian or Laplace, zero-mean, fresh per answer): average 4 answers per image
      (4x the queries per map; the noise's norm falls by half);
    - sign, quantisation, top-k, coarsening: the maps keep a direction but not a
      magnitude: match directions (cosine), give each class's map the norm of the clone's
      own, and scale the victim's gradient to the clone's;
    - predicted class only: read the maps as the predicted class's map;
    - withholding maps for a fraction >= 1/2 of queries: the generator falls back to
      zeroth-order estimates; where the attack asks for maps on its clone's queries
      (explain_clone_queries), the clone keeps learning from the maps that come back
      (images with all-zero maps are left out of that term; an attacker with images, which
      has no generator, does only that: see :func:`applicable_settings`);
    - reverse sigmoid that keeps the label on top (its default): the attacker with images
      reads every answer as its label alone, one-hot (the perturbed probabilities would
      also mis-scale the maps, which are read as d log p / dx through them);
    - other prediction defences (rounding, top-k, label only) and smoothing: no adaptation
      here; the attack already leaves classes shown as 0 out of its maps.
    """
    settings: dict[str, Any] = {}
    for defense in defenses:
        if isinstance(defense, dict):
            params = dict(defense)
            name = params.pop("name", None)
        else:
            params, name = defense.values(), defense.name
        if name in ("noise", "gaussian", "laplace") and float(params.get("scale", 1)) > 0:
            settings["map_repeats"] = max(settings.get("map_repeats", 1), 4)
        elif name in ("sign", "quantize", "topk", "coarsen"):
            settings.update(map_scale="clone", map_matching="cosine")
        elif name == "predicted-only":
            settings["maps_of"] = "predicted"
        elif name == "withhold" and float(params.get("fraction", 0)) >= 0.5:
            settings["generator_gradient"] = "zeroth-order"
        elif name == "reverse-sigmoid" and FLAG.parse(
            params.get("keep_label", True), "reverse-sigmoid: keep_label"
        ):
            settings["answers_as"] = "labels"
    return settings


def applicable_settings(config_class: type, settings: dict[str, Any]) -> dict[str, Any]:
    """The entries of `settings` that `config_class` has a field for.

    :func:`adapt_to` answers for every adaptive attacker at once, so some of what it returns
    may not apply to a given one: the attacker with images has no generator, so
    `generator_gradient` (with `directions` and `epsilon`), MEGEX's fallback when maps are
    withheld, means nothing to it, and withheld (all-zero) maps are already left out of its
    map term as unknown. Passing such a setting would be refused as unknown."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {name: value for name, value in settings.items() if name in fields}
