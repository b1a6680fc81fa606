"""DisGUIDE (Rosenthal et al., AAAI 2023): several clones, and a generator that seeks where
they disagree, without asking the victim.

Where the clones disagree they are unsure of the victim, so images from there are worth
a query. The generator is trained on the clones alone (no queries): it ascends

    D(x) = mean over images and classes of std_i softmax(clone_i(x))   (std across clones)

plus `class_balance` times the entropy of the clones' averaged prediction over the batch
(the paper's class-diversity term, lambda: 0.2 on CIFAR-10, 0.04 on CIFAR-100). Every query
is a clone query: each clone learns the victim's answers on generated images with the
shared loss (`loss`: 'l1' on recovered logits, the paper's soft-label loss), and replays
stored answers. What is evaluated and saved is the clones' soft vote (the log of their mean
softmax; the paper reports its accuracy), as one module (:class:`megex.models.SoftVote`).
The authors' code (lin-tan/disguide) also turns every 8th CIFAR image grey: a prior about
colour images, left out here as the data-free table leaves priors out.

Dual students (Beetham et al., ICLR 2023) is the same loop with another discrepancy (the
mean absolute difference of two clones' logits) and the first clone evaluated:
`discrepancy` and `evaluated` here, and :mod:`.dual_students` with its defaults.

Compute per query: one optimiser step of one clone on one batch is one clone update, so a
batch that trains N clones counts N, and the engine's `clone_updates_per_1k_queries`
allots the same clone steps per query as it does a single-clone attack (DFME): the N
clones share them (replay makes up the rest, each replayed batch training every clone).

`disguide-maps` (:class:`DisGUIDEMaps`) is the attacker when the service returns gradient
maps: the generator needs no victim gradient, so the maps train the clones, each matching
its input gradients to every answered map (MEGEX's Jacobian matching, :mod:`.maps`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import accel
from ..models import SoftVote, build_classifier, fast_layout, soft_vote_arch
from ..oracle import Oracle
from ..settings import override
from .base import Attack
from .config import AT_LEAST_0, AttackConfig, Choice, Number, SettingError, setting
from .maps import frozen_batch_norm, map_matching_loss
from .megex import MEGEX, MEGEXConfig
from .training import disagreement, new_weight_average, step_schedules, warmed_weight_average

__all__ = [
    "DISCREPANCIES",
    "DisGUIDE",
    "DisGUIDEConfig",
    "DisGUIDEMaps",
    "DisGUIDEMapsConfig",
    "clone_discrepancy",
]

DISCREPANCIES = ("softmax_std", "logit_l1")


@dataclass(frozen=True)
class DisGUIDEConfig(AttackConfig):
    clones: int = setting(
        2, "clones trained side by side (the paper's ensemble size)", Number(2, whole=True),
        "disguide",
    )  # fmt: skip
    discrepancy: str = setting(
        "softmax_std",
        "what the generator maximises between the clones: 'softmax_std' (DisGUIDE: the "
        "standard deviation across clones of their softmax outputs, averaged over classes "
        "and images) or 'logit_l1' (dual students: the mean absolute difference of two "
        "clones' logits, averaged over pairs of clones)",
        Choice(DISCREPANCIES),
        "disguide",
    )
    evaluated: str = setting(
        "soft_vote",
        "the model evaluated and saved: 'soft_vote' (the log of the clones' mean softmax, "
        "what DisGUIDE reports) or 'first' (the first clone, what dual students reports); "
        "each clone's weight average where clone_ema > 0",
        Choice(("soft_vote", "first")),
        "disguide",
    )
    class_balance: float = setting(
        0.2,
        "weight of the class-diversity term: the entropy of the clones' averaged prediction "
        "over a batch (DisGUIDE's lambda: 0.2 on CIFAR-10, 0.04 on CIFAR-100); 0: off",
        AT_LEAST_0,
        "objective",
    )
    # The rate both papers' scripts use (lin-tan/disguide, James-Beetham/dual_students): a
    # generator that only has to find the clones' disagreement moves slowly.
    generator_lr: float = override(AttackConfig, "generator_lr", 1e-4)
    # The generator sends no queries, so no victim answer can reward its confidence.
    victim_confidence: float = override(AttackConfig, "victim_confidence", 0.0)

    def check_combination(self) -> None:
        super().check_combination()
        if self.victim_confidence > 0:
            raise SettingError(
                "victim_confidence: this attack's generator learns from its clones alone and "
                "sends no queries, so the victim's confidence cannot guide it; set it to 0"
            )


def clone_discrepancy(logits: torch.Tensor, form: str) -> torch.Tensor:
    """How much clones disagree on a batch, from their logits (images, clones, classes):
    'softmax_std' (DisGUIDE) or 'logit_l1' (dual students); 0 where they agree."""
    if form == "softmax_std":
        # torch.std's value (unbiased across clones), with a gradient of 0 rather than NaN
        # where the clones agree exactly (a saturated softmax).
        var = F.softmax(logits, dim=2).var(dim=1)
        agree = var <= 0
        return torch.where(agree, 0.0, torch.where(agree, 1.0, var).sqrt()).mean()
    if form == "logit_l1":
        n = logits.shape[1]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        return torch.stack([(logits[:, i] - logits[:, j]).abs().mean() for i, j in pairs]).mean()
    raise ValueError(f"discrepancy: expected one of {', '.join(DISCREPANCIES)}, got {form!r}")


@dataclass
class _Clone:
    """One clone and what trains it: its optimiser, schedule and weight average."""

    model: nn.Module
    opt: torch.optim.Optimizer
    schedule: Any
    average: nn.Module | None
    averaged: int = 0  # updates folded into `average`


class DisGUIDE(Attack):
    name = "disguide"
    config_class = DisGUIDEConfig

    def queries_per_generator_step(self) -> int:
        return 0

    def setup(self, oracle: Oracle, iterations: int) -> None:
        super().setup(oracle, iterations)
        c = self.config
        channels, size, _ = oracle.input_shape
        # The first clone is the base's (self.clone and its optimiser, schedule, average).
        self.clones = [_Clone(self.clone, self.clone_opt, self.clone_sched, self.clone_ema_model)]
        for _ in range(c.clones - 1):
            model = fast_layout(
                build_classifier(self.clone_arch, oracle.num_classes, channels, size),
                c.device,
                accel.uses_channels_last(c),
            )
            # The first clone's optimiser settings (learning-rate scaling included).
            opt = type(self.clone_opt)(model.parameters(), **self.clone_opt.defaults)
            (schedule,) = step_schedules(c, iterations, opt)
            average = new_weight_average(model) if c.clone_ema > 0 else None
            self.clones.append(_Clone(model, opt, schedule, average))
        self.member_arch = self.clone_arch
        self.soft_vote = None
        if c.evaluated == "soft_vote":
            self.soft_vote = SoftVote([self._evaluated_weights(m) for m in self.clones])
            # What is saved is the soft vote: its file loads by this name.
            self.clone_arch = soft_vote_arch(self.member_arch, c.clones)

    @staticmethod
    def _evaluated_weights(clone: _Clone) -> nn.Module:
        return clone.average if clone.average is not None else clone.model

    def member_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Clone i's logits, as the speed settings compute them (float32)."""
        return self._pass("clone" if i == 0 else f"clone{i}", self.clones[i].model)(x)

    # --- one iteration --------------------------------------------------------------------

    def step(self, oracle: Oracle) -> dict[str, Any]:
        for clone in self.clones:
            clone.model.train()
        return super().step(oracle)

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        """One generator update on the clones' disagreement: no queries."""
        c = self.config
        _, x = self.generate(self.sample_latent(c.batch_size))
        # The clones judge as they predict (batch norm in eval mode, as the authors' code
        # does): generated images do not enter their running statistics.
        with contextlib.ExitStack() as frozen:
            for clone in self.clones:
                frozen.enter_context(frozen_batch_norm(clone.model))
            logits = torch.stack([self.member_forward(i, x) for i in range(c.clones)], dim=1)
        discrepancy = clone_discrepancy(logits, c.discrepancy)
        objective = -self.disagreement_now() * discrepancy
        if c.class_balance > 0:
            vote = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(c.clones)
            objective = objective - c.class_balance * self.balance_term(vote)
        self.generator_opt.zero_grad(set_to_none=True)
        objective.backward()
        self.generator_opt.step()
        self.generator_updates += 1
        for clone in self.clones:
            # The pass left gradients in the clones that are not theirs to learn from.
            clone.opt.zero_grad(set_to_none=True)
        return {"generator_loss": accel.logged(discrepancy, c)}

    def clone_update(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Any = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> float | torch.Tensor:
        """One optimiser step of every clone on answered images (fresh or replayed); each
        counts as one clone update."""
        c = self.config
        maps = self.batch_maps(x, answer, stored)
        total = torch.zeros((), device=x.device)
        for i, clone in enumerate(self.clones):
            loss = self.member_loss(i, x, probs, maps)
            clone.opt.zero_grad(set_to_none=True)
            loss.backward()
            clone.opt.step()
            self.clone_updates += 1
            if clone.average is not None:
                clone.averaged += 1
                warmed_weight_average(clone.average, clone.model, c.clone_ema, clone.averaged)
            total = total + loss.detach()
        return accel.logged(total / len(self.clones), c)

    def batch_maps(
        self, x: torch.Tensor, answer: Any, stored: dict[str, torch.Tensor] | None
    ) -> Any:
        """What the clones learn from a batch besides its answers (None: nothing)."""
        return None

    def member_loss(
        self, i: int, x: torch.Tensor, probs: torch.Tensor, maps: Any = None
    ) -> torch.Tensor:
        """Clone i's training loss on answered images (the shared clone-victim distance)."""
        return disagreement(self.member_forward(i, x), probs, self.config.loss).mean()

    def replay(self, updates: int) -> float | None:
        # Each replayed batch trains every clone (as the authors' replay does), N updates: the
        # batches are rounded up, so the clones never fall below the allotment (as one
        # clone's replay never does) and pass it by fewer than N updates.
        return super().replay(math.ceil(updates / len(self.clones)))

    def end_iteration(self) -> None:
        for clone in self.clones[1:]:
            clone.schedule.step()
        super().end_iteration()

    def eval_model(self) -> nn.Module:
        """The soft vote of the clones, or the first clone (`evaluated`); weight averages
        where clone_ema > 0."""
        if self.soft_vote is not None:
            return self.soft_vote
        return self._evaluated_weights(self.clones[0])

    def details(self) -> dict[str, Any]:
        c = self.config
        n = c.clones
        objective = {
            "softmax_std": "the standard deviation of the clones' softmax outputs",
            "logit_l1": "the mean absolute difference of the clones' logits",
        }[c.discrepancy]
        if c.class_balance > 0:
            objective += f" plus {c.class_balance:g} x the entropy of their mean prediction"
        evaluated = (
            f"soft vote of the {n} clones (log of their mean softmax)"
            if c.evaluated == "soft_vote"
            else f"the first of the {n} clones"
        )
        if c.clone_ema > 0:
            evaluated += ", weight averages"
        return {
            "generator": f"no queries: maximises {objective}",
            "clones": n,
            "evaluated": evaluated,
            "clone_updates": "one per clone per optimiser step: the allotment per query is "
            "shared by the clones",
        }

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the first clone's, with the generator and the rest
        state["other_clones"] = [
            {
                "clone": clone.model.state_dict(),
                "clone_opt": clone.opt.state_dict(),
                "clone_sched": clone.schedule.state_dict(),
                **({"clone_ema": clone.average.state_dict()} if clone.average is not None else {}),
            }
            for clone in self.clones[1:]
        ]
        state["clone_ema_updates"] = [clone.averaged for clone in self.clones]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for clone, saved in zip(self.clones[1:], state["other_clones"], strict=True):
            clone.model.load_state_dict(saved["clone"])
            clone.opt.load_state_dict(saved["clone_opt"])
            clone.schedule.load_state_dict(saved["clone_sched"])
            if clone.average is not None:
                clone.average.load_state_dict(saved["clone_ema"])
        for clone, averaged in zip(self.clones, state["clone_ema_updates"], strict=True):
            clone.averaged = int(averaged)


# --- with gradient maps: the clones also match them -----------------------------------------


@dataclass(frozen=True)
class DisGUIDEMapsConfig(DisGUIDEConfig, MEGEXConfig):
    # Every query is a clone query: the maps come with them, or not at all.
    explain_clone_queries: bool = override(MEGEXConfig, "explain_clone_queries", True)
    replay_maps: bool = override(MEGEXConfig, "replay_maps", True)

    def check_combination(self) -> None:
        super().check_combination()
        if not self.explain_clone_queries:
            raise SettingError(
                "explain_clone_queries: disguide-maps asks for maps with its clones' queries "
                "(its generator sends none), so it needs true; without maps use disguide"
            )


class DisGUIDEMaps(DisGUIDE, MEGEX):
    """DisGUIDE whose clones also match their input gradients to every answered map (fresh,
    and replayed with `replay_maps`): MEGEX's map reading and matching, for each clone."""

    name = "disguide-maps"
    config_class = DisGUIDEMapsConfig

    def batch_maps(
        self, x: torch.Tensor, answer: Any, stored: dict[str, torch.Tensor] | None
    ) -> Any:
        # One projection per batch, shared by the clones.
        if self.config.explanation_loss <= 0:
            return None
        return self.map_targets(x, answer, stored)

    def member_loss(
        self, i: int, x: torch.Tensor, probs: torch.Tensor, maps: Any = None
    ) -> torch.Tensor:
        if maps is None:
            return super().member_loss(i, x, probs)
        c = self.config
        target, weights, spec = maps
        return map_matching_loss(
            self.clones[i].model, x, probs, target, weights, spec, c.loss, c.explanation_loss,
            self.map_error,
        )  # fmt: skip

    def details(self) -> dict[str, Any]:
        spec = self.explanation_used
        return {
            **DisGUIDE.details(self),
            "explanation": None if spec is None else spec.to_dict(),
            "maps": "each clone matches its input gradients to the maps (Jacobian matching); "
            "the generator uses none",
        }
