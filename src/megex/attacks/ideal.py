"""IDEAL (Zhang, Chen and Lyu, ICLR 2023): a generator trained on the clone alone makes each
batch, and the victim is asked once per image.

Every batch of queries is made in two stages, as the paper's epochs are:

1. Data generation, no queries. The generator is re-drawn (fresh weights, fresh Adam state;
   `generator_restart_every`: before every batch by default, as the paper re-initialises it
   every epoch) and trained `generator_steps` times on one fixed batch of latents, each
   asked for a class, the classes in turn (0, 1, ..., K-1, 0, ...). Its loss is the clone's:

       L = CE(clone(G(z)), y) + class_balance * L_info,
       L_info = (1/K) sum_k p_k log p_k

   the cross-entropy makes images the clone is sure are of their class. L_info is minus an
   information entropy (`information_of`): of each image's prediction p, averaged over the
   batch, as the authors' code takes it (it keeps any one image from being too sure), or of
   the batch's mean prediction m, as the paper describes it (lowest when every class is hit
   equally). The authors' code weighs it by 5. The images sent are those of the iterate
   with the lowest loss (as the authors' code keeps).
2. Distillation. The batch is sent once; the clone learns the answers (`clone_target`: the
   victim's top-1 class by cross-entropy, as the paper, which assumes a service that returns
   labels; or the returned probabilities through the shared `loss`), and they are stored for
   replay.

Compute per query is the engine's: each answered batch is one clone update, and the engine's
`clone_updates_per_1k_queries` allotment is made up by replaying stored answers (the
authors' student trains on every image generated so far each epoch; replay is this loop's
counterpart, with the allotment every method gets). The generator's steps are not clone
updates and the engine does not count them: IDEAL makes `generator_steps` of them per
batch (1 to 30; 30 in the authors' MNIST runs, 5 in their CIFAR-10 ones), each a pass of
the generator and the one clone, where DisGUIDE makes one step per iteration (one batch by
default) through its N clones; at the authors' values IDEAL spends 5 to 30 times DisGUIDE's
generator compute per query, which is why the setting is bounded and reported.

From the authors' code (SonyResearch/IDEAL), besides the weight 5: the generator's Adam has
beta1 = 0.5, and the clone judges with batch normalisation in eval mode. Left out: their
random crops and flips of the generated images before the student (a prior about the
domain's images), and their generator's own architecture and initialisation (the shared
generator is re-drawn as every attack's is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import accel
from ..oracle import Oracle
from ..settings import override
from .base import Attack
from .config import AT_LEAST_0, COUNT_0, AttackConfig, Choice, Number, SettingError, setting
from .maps import frozen_batch_norm
from .training import LOG_EPS, step_schedules

__all__ = [
    "CLONE_TARGETS",
    "INFORMATION_OF",
    "Ideal",
    "IdealConfig",
    "balanced_classes",
    "ideal_generator_loss",
]

CLONE_TARGETS = ("top1", "probabilities")
INFORMATION_OF = ("image", "batch")
# The authors' generator optimiser: Adam with DCGAN's beta1.
GENERATOR_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class IdealConfig(AttackConfig):
    generator_steps: int = setting(
        30,
        "generator updates per generated batch, all on the batch's latents (IDEAL's "
        "generator iterations: 30 in the authors' MNIST runs, 5 in their CIFAR-10 ones; "
        "DisGUIDE makes 1 per batch)",
        Number(1, 30, whole=True),
    )
    generator_restart_every: int = setting(
        1,
        "re-draw the generator (fresh weights and Adam state) before a batch whenever this "
        "many more queries have been spent: up to batch_size, before every batch, as IDEAL "
        "re-initialises it every epoch (the default, 1); 0: never",
        COUNT_0,
    )
    class_balance: float = setting(
        5.0,
        "weight of the information-entropy term (1/K) sum_k p_k log p_k (the authors' "
        "code: 5); 0: off",
        AT_LEAST_0,
        "objective",
    )
    information_of: str = setting(
        "image",
        "whose prediction p the information-entropy term takes: 'image' (each image's, "
        "averaged over the batch: the authors' code) or 'batch' (the batch's mean "
        "prediction, lowest when the classes are hit equally: the paper's description)",
        Choice(INFORMATION_OF),
        "ideal",
    )
    clone_target: str = setting(
        "top1",
        "what the clone learns from an answer: 'top1' (the victim's top-1 class, "
        "cross-entropy: IDEAL, which assumes a service that returns labels) or "
        "'probabilities' (the returned probabilities, through the shared `loss`)",
        Choice(CLONE_TARGETS),
        "ideal",
    )
    # The authors' rate: a fresh generator has a few steps to find its images.
    generator_lr: float = override(AttackConfig, "generator_lr", 1e-3)
    # The generator sends no queries, so no victim answer can reward its confidence.
    victim_confidence: float = override(AttackConfig, "victim_confidence", 0.0)

    def check_combination(self) -> None:
        super().check_combination()
        if self.victim_confidence > 0:
            raise SettingError(
                "victim_confidence: ideal's generator learns from its clone alone and sends "
                "no queries, so the victim's confidence cannot guide it; set it to 0"
            )
        if self.disagreement_until > 0:
            raise SettingError(
                "disagreement_until: ideal's generator has no disagreement term to drop "
                "(its terms are the clone's confidence and class balance); set it to 0"
            )


def balanced_classes(n: int, num_classes: int, device: Any = "cpu") -> torch.Tensor:
    """The classes a batch of `n` generated images is asked for: 0, 1, ..., K-1, 0, ..."""
    return torch.arange(n, device=device) % num_classes


def ideal_generator_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_balance: float,
    information_of: str = "image",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, confidence term, information term) of IDEAL's generator from the clone's
    logits on a generated batch (images, classes) and the classes asked for: the mean
    cross-entropy plus `class_balance` times (1/K) sum_k p_k log p_k, p each image's softmax
    averaged over the batch ('image') or the batch's mean softmax ('batch'); either runs
    from -log(K)/K (p uniform) up to 0 (p one class)."""
    if information_of not in INFORMATION_OF:
        raise ValueError(
            f"information_of: expected one of {INFORMATION_OF}, got {information_of!r}"
        )
    confidence = F.cross_entropy(logits, targets)
    probs = F.softmax(logits, dim=1)
    if information_of == "batch":
        probs = probs.mean(dim=0, keepdim=True)
    information = (probs * probs.clamp_min(LOG_EPS).log()).sum(dim=1).mean() / logits.shape[1]
    return confidence + class_balance * information, confidence, information


class Ideal(Attack):
    name = "ideal"
    config_class = IdealConfig

    def queries_per_generator_step(self) -> int:
        return 0

    def setup(self, oracle: Oracle, iterations: int) -> None:
        super().setup(oracle, iterations)
        self.num_classes = int(oracle.num_classes)
        # The shared optimiser's rate (learning-rate scaling included), the authors' betas.
        rate = self.generator_opt.defaults["lr"]
        self.generator_opt = torch.optim.Adam(
            self.generator.parameters(), lr=rate, betas=GENERATOR_BETAS
        )
        (self.generator_sched,) = step_schedules(self.config, iterations, self.generator_opt)

    # --- one iteration --------------------------------------------------------------------

    def step(self, oracle: Oracle) -> dict[str, Any]:
        """`clone_steps` batches, each generated (no queries), sent once and learnt."""
        c = self.config
        self.clone.train()
        self.generator.train()
        info: dict[str, Any] = {}
        for _ in range(c.clone_steps):
            self.queries_at_step = int(oracle.queries_used)
            self.restart_generator_if_due(self.queries_at_step)
            x, info["generator_loss"] = self.generate_batch()
            answer = self.ask(oracle, x)
            probs = answer.probabilities.to(c.device)
            self.observe(x, probs, answer)
            info["clone_loss"] = self.clone_update(x, probs, answer)
        return info

    def generate_batch(self) -> tuple[torch.Tensor, Any]:
        """A batch of images from `generator_steps` generator updates on the clone's loss
        (no queries), and that loss: the iterate with the lowest loss."""
        c = self.config
        z = self.sample_latent(c.batch_size)
        targets = balanced_classes(c.batch_size, self.num_classes, z.device)
        best_x, best_loss = torch.empty(0), torch.empty(0)
        for step in range(c.generator_steps):
            _, x = self.generate(z)
            # Generated images do not enter the clone's batch-norm statistics.
            with frozen_batch_norm(self.clone):
                logits = self.clone_forward(x)
            loss, _, _ = ideal_generator_loss(logits, targets, c.class_balance, c.information_of)
            value, image = loss.detach(), x.detach()
            if step == 0:
                best_x, best_loss = image, value
            else:
                # Chosen on the device (no wait for it); the earlier iterate on a tie.
                better = value < best_loss
                best_x = torch.where(better, image, best_x)
                best_loss = torch.where(better, value, best_loss)
            self.generator_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.generator_opt.step()
            self.generator_updates += 1
        # The pass left gradients in the clone that are not its to learn from.
        self.clone_opt.zero_grad(set_to_none=True)
        return best_x, accel.logged(best_loss, c)

    def clone_loss(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Any = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Cross-entropy to the victim's top-1 class (`clone_target` 'top1'), or the shared
        clone-victim distance on the probabilities."""
        if self.config.clone_target == "top1":
            return F.cross_entropy(self.clone_forward(x), probs.argmax(dim=1))
        return super().clone_loss(x, probs, answer, stored)

    def details(self) -> dict[str, Any]:
        c = self.config
        every = c.generator_restart_every
        if every == 0:
            drawn = "never re-drawn"
        elif every <= c.batch_size:
            drawn = "re-drawn before every batch"
        else:
            drawn = f"re-drawn every {every} queries"
        target = {
            "top1": "the victim's top-1 class (cross-entropy)",
            "probabilities": f"the victim's probabilities ({c.loss})",
        }[c.clone_target]
        return {
            "generator": f"no queries: {c.generator_steps} updates per batch on the clone's "
            f"cross-entropy to the classes asked for plus {c.class_balance:g} x the "
            f"information entropy of {'each image' if c.information_of == 'image' else 'the batch'}"
            f"'s prediction; {drawn}",
            "clone_target": target,
        }
