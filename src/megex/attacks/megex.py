"""MEGEX (Miura et al., 2021): the generator learns from the explanations the service returns.

The generator maximises DFME's disagreement L(x) = mean_k |lv_k(x) - ls_k(x)| between the
victim's recovered logits lv = log p - mean(log p) and the clone's logits ls. With
s = sign(lv - ls) and s_bar = mean_k s:

    dL/dx = (1/K) [ sum_k (s_k - s_bar) d log p_k/dx  -  sum_k s_k d ls_k/dx ]

The clone term comes from autograd; the victim term from an explanation of every class
("exact"). When the service explains one class c only, the loss is |log pV_c - log pS_c|,
whose gradient needs only that class ("single-class"). Either way a generator query costs 1.

Beyond the paper, each a named option measured in docs/results/:
the generator also raises the victim's log-probability of a class its latent picks, read off
the maps (`victim_confidence`); the clone also learns the maps themselves by matching its own
input gradients to them (`explanation_loss`); plus the shared loop's options (replay, clone
steps on the generator's queries, brightness prior, constant schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import accel
from ..explain import Explanation
from ..oracle import Answer, Oracle
from .base import Attack
from .config import AT_LEAST_0, FLAG, AttackConfig, SettingError, setting
from .maps import (
    INTEGRATED_GRADIENTS_MIN_PROBABILITY,  # noqa: F401 (still importable from here)
    class_combination,
    clone_path_gradient,
    disagreement_gradient,
    explained_class,
    frozen_batch_norm,  # noqa: F401 (still importable from here)
    log_probability_gradients,
    map_matching_loss,
    relative_map_error,
)

__all__ = ["MEGEX", "MEGEXConfig", "log_probability_gradients"]


@dataclass(frozen=True)
class MEGEXConfig(AttackConfig):
    explanation: Explanation | None = setting(
        None,
        "the explanation to ask the service for (None: whatever it offers by default)",
        group="megex",
    )
    explanation_loss: float = setting(
        1.0,
        "train the clone on the maps too: match its input gradients of log-probabilities to "
        "them (relative squared error, this weight; one random projection over classes for "
        "all-class maps); 0: off",
        AT_LEAST_0,
        "megex",
    )
    replay_maps: bool = setting(
        False,
        "keep each answer's map (projected over classes, float16) in the replay buffer, so "
        "that replayed clone updates learn the maps too",
        FLAG,
        "megex",
    )
    explain_clone_queries: bool = setting(
        False,
        "ask for maps on clone-step queries as well (same query count), so the explanation "
        "loss sees every fresh batch",
        FLAG,
        "megex",
    )
    class_balance: float | None = setting(
        None,
        "reward an even spread of the clone's classes (None: 1 when the service explains one "
        "class, which otherwise collapses the generator onto few classes; 0 for all classes)",
        AT_LEAST_0,
        "objective",
    )

    def __post_init__(self) -> None:
        if self.explanation is not None and not isinstance(self.explanation, Explanation):
            raise SettingError(
                f"explanation: expected an Explanation or None, got {self.explanation!r}"
            )
        super().__post_init__()


class MEGEX(Attack):
    name = "megex"
    config_class = MEGEXConfig

    def queries_per_generator_step(self) -> int:
        return 1

    def setup(self, oracle: Oracle, iterations: int) -> None:
        super().setup(oracle, iterations)
        self.explanation_used: Explanation | None = None
        # (answer, its d log p / dx) while the generator step that paid for it runs.
        self._dlogp_of: tuple[Answer, torch.Tensor] | None = None

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        c = self.config
        z = self.sample_latent(c.batch_size)
        _, x = self.generate(z)
        answer, dlogp = self._ask_for_maps(oracle, x)
        probs = answer.probabilities.to(x.device)
        clone_logits = self.clone_forward(x)
        victim_grad, clone_term, loss_value = disagreement_gradient(
            answer, dlogp, probs, clone_logits, c.loss
        )
        victim_grad = self.scale_victim_gradient(victim_grad, clone_term, x)
        # The weight of the disagreement objective itself (the paper's: 1).
        weight = self.disagreement_now()
        victim_grad = weight * victim_grad
        clone_term = weight * clone_term
        if c.victim_confidence > 0:
            victim_grad, clone_term = self._add_victim_confidence(
                z, answer, dlogp, probs, clone_logits, victim_grad, clone_term
            )
        objective = self._generator_objective(
            x, dlogp, probs, clone_logits, victim_grad, clone_term
        )
        info = {"generator_loss": accel.logged(loss_value, c)}
        info = self.finish_generator_step(objective, x.detach(), probs, answer, info)
        self._dlogp_of = None
        return info

    def _ask_for_maps(self, oracle: Oracle, x: torch.Tensor) -> tuple[Answer, torch.Tensor]:
        """Query the generator's images with explanations; (answer, its d log p / dx)."""
        c = self.config
        request = c.explanation if c.explanation is not None else True
        answer = self.ask(oracle, x, request)
        if answer.explanation is None or answer.explanation_spec is None:
            raise RuntimeError("megex: the oracle returned no explanation; MEGEX needs one")
        self.explanation_used = answer.explanation_spec
        dlogp = self.map_gradients(answer, x.detach())
        # The clone step on these answers (train_on_generator_queries) needs them again.
        self._dlogp_of = (answer, dlogp)
        return answer, dlogp

    def _add_victim_confidence(
        self,
        z: torch.Tensor,
        answer: Answer,
        dlogp: torch.Tensor,
        probs: torch.Tensor,
        clone_logits: torch.Tensor,
        victim_grad: torch.Tensor,
        clone_term: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both parts plus the victim's log-probability of the class each latent picks."""
        weight = self.config.victim_confidence
        n, k = probs.shape
        # The latent picks the class (argmax of its first K values: uniform, so the
        # queries are class-balanced).
        targets = self.latent_classes(z, k).to(probs.device)
        if dlogp.dim() == 5:
            # Its gradient is read off the all-class maps.
            confidence = dlogp[torch.arange(n, device=probs.device), targets]
            return victim_grad + weight * confidence, clone_term
        # Only the predicted class's map: where it is the latent's class, the victim's
        # gradient raises it; elsewhere the clone stands in for the victim (its own
        # log-probability of the latent's class, by autograd, no queries).
        hit = (targets == explained_class(answer).to(probs.device)).float()
        victim_grad = victim_grad + weight * hit.view(-1, 1, 1, 1) * dlogp
        lps_t = F.log_softmax(clone_logits, dim=1).gather(1, targets.view(-1, 1))
        lps_t = lps_t.view(-1)
        return victim_grad, clone_term - weight * ((1 - hit) * lps_t).sum()

    def _generator_objective(
        self,
        x: torch.Tensor,
        dlogp: torch.Tensor,
        probs: torch.Tensor,
        clone_logits: torch.Tensor,
        victim_grad: torch.Tensor,
        clone_term: torch.Tensor,
    ) -> torch.Tensor:
        """What the generator descends on: minus the disagreement, minus the class balance."""
        n = probs.shape[0]
        # Ascend L: the victim term enters through the image with its gradient held fixed.
        objective = -((x * victim_grad.detach()).sum() - clone_term) / n
        balance = self.config.class_balance
        if balance is None:
            balance = 0.0 if dlogp.dim() == 5 else 1.0
        if balance > 0:
            objective = objective - balance * self.balance_term(clone_logits)
        return objective

    def clone_query_explanation(self) -> Any:
        c = self.config
        if not (c.explain_clone_queries and c.explanation_loss > 0):
            return None
        return c.explanation if c.explanation is not None else True

    def replays_maps(self) -> bool:
        return bool(self.config.replay_maps)

    def projected_maps(self, answer: Answer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_k v_k d log p_k / dx, v) for an answer's maps: v ~ N(0, I) per image for
        maps of every class, the explained class's one-hot for one class's map."""
        cached = self._dlogp_of
        if cached is not None and cached[0] is answer:
            dlogp = cached[1]
        else:
            dlogp = self.map_gradients(answer, x.detach())
        n, k = answer.probabilities.shape
        # A class whose map is unknown (all zeros, see log_probability_gradients) gets weight
        # 0, so the clone is not taught a zero gradient for it.
        known = dlogp.flatten(dlogp.dim() - 3).ne(0).any(dim=-1).to(dlogp.dtype)
        if dlogp.dim() == 5:
            # E_v[(v.(Js - Jv))^2] = ||Js - Jv||^2 for v ~ N(0, I): one backward, unbiased.
            v = self.draw_normal(n, k).to(x.device) * known
            return class_combination(v, dlogp), v
        cls = explained_class(answer).to(x.device)
        return dlogp, F.one_hot(cls, k).to(dlogp.dtype) * known.view(-1, 1)

    def observe(self, x: torch.Tensor, probs: torch.Tensor, answer: Answer | None = None) -> None:
        if self.replay_buffer is None:
            return
        if self.replay_buffer.stores_maps and answer is not None and answer.explanation is not None:
            maps, weights = self.projected_maps(answer, x)
            self.replay_buffer.add(x, probs, self.rng, maps=maps, projections=weights)
        else:
            self.replay_buffer.add(x, probs, self.rng)

    def clone_loss(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Answer | None = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        maps = self.map_targets(x, answer, stored) if self.config.explanation_loss > 0 else None
        if maps is None:
            return super().clone_loss(x, probs)
        return self.loss_with_maps(x, probs, *maps)

    def map_targets(
        self,
        x: torch.Tensor,
        answer: Answer | None = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Explanation | None] | None:
        """What a clone's input gradients are matched to on a batch: (the projected maps,
        their weights over classes, the explanation they came from), from a fresh `answer`
        or a replayed batch (`stored`); None when the batch has no maps."""
        if answer is not None and answer.explanation is not None:
            target, weights = self.projected_maps(answer, x)
            spec = answer.explanation_spec
            # Maps replayed later came with this explanation (also before any generator step).
            self.explanation_used = self.explanation_used or spec
            return target, weights, spec
        if stored is not None and "maps" in stored:
            # Replayed maps came in answers to the explanation this run asks for.
            spec = self.explanation_used or self.config.explanation
            return stored["maps"], stored["projections"], spec
        return None

    def loss_with_maps(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor,
        spec: Explanation | None = None,
    ) -> torch.Tensor:
        """Disagreement plus input-gradient matching (:func:`.maps.map_matching_loss`)."""
        c = self.config
        return map_matching_loss(
            self.clone,
            x,
            probs,
            target,
            weights,
            spec,
            c.loss,
            c.explanation_loss,
            self.map_error,
            self.clone_path_gradient,
        )

    def clone_path_gradient(
        self, x: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, spec: Explanation
    ) -> torch.Tensor:
        """The clone's path average that an integrated-gradients map is matched with
        (:func:`.maps.clone_path_gradient`)."""
        return clone_path_gradient(self.clone, x, probs, weights, spec)

    def map_gradients(self, answer: Answer, x: torch.Tensor) -> torch.Tensor:
        """d log p / dx read off an answer's maps (log_probability_gradients; a hook for
        attackers that know the maps' magnitudes were changed)."""
        return log_probability_gradients(answer, x)

    def map_error(self, grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per image, how far the clone's input gradient is from the map's (a hook):
        :func:`.maps.relative_map_error`."""
        return relative_map_error(grad, target)

    def scale_victim_gradient(
        self, victim_grad: torch.Tensor, clone_term: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """The victim's part of the generator's gradient, as the maps give it (a hook for
        attackers that know the maps' magnitudes were changed)."""
        return victim_grad

    def details(self) -> dict[str, Any]:
        spec = self.explanation_used
        if spec is None:
            return {"explanation": None}
        if spec.target == "all":
            kind = (
                "exact (all classes)"
                if spec.method == "gradient"
                else "all classes, approximate maps"
            )
        elif spec.output == "logit":
            # d log p_c is approximated by (1 - p_c) d z_c (log_probability_gradients).
            kind = "single class, approximated from one logit"
        else:
            kind = "single class"
        return {"explanation": spec.to_dict(), "generator_gradient": kind}
