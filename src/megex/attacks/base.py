"""What every data-free extraction attack shares: models, optimisers, replay, state.

An attack is `setup(oracle, iterations)`, `step(oracle)` (one iteration: generator updates,
then clone updates on fresh queries), `replay(n)` (clone updates on stored answers, which
cost no queries), `state_dict` / `load_state_dict` and `eval_model`. It spends queries only
through the oracle it is given and never counts them itself; the loop around it
(:mod:`megex.engine`) owns the budget, the compute allotted per query, evaluation,
checkpoints and progress. A subclass provides `queries_per_generator_step` and
`generator_step`, and ends the latter with :meth:`Attack.finish_generator_step`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import accel
from ..models import build_classifier, build_generator, fast_layout
from ..oracle import Answer, Oracle
from .config import AttackConfig, with_overrides
from .replay import ReplayBuffer
from .training import (
    LOG_EPS,
    disagreement,
    new_weight_average,
    optimisers,
    step_schedules,
    victim_targets,
    warmed_weight_average,
)

__all__ = ["Attack", "AttackConfig", "default_clone_arch", "victim_targets"]


def default_clone_arch(input_shape: tuple[int, int, int]) -> str:
    """A clone that fits the images: small_cnn for 8x8, lenet5 up to 28x28, else ResNet-18-8x."""
    size = input_shape[1]
    if size <= 8:
        return "small_cnn"
    if size <= 28:
        return "lenet5"
    return "resnet18_8x"


class Attack:
    """Base class: subclasses set `name`, `config_class`, and the generator step."""

    name = "attack"
    config_class: type[AttackConfig] = AttackConfig

    def __init__(self, config: AttackConfig | None = None, **overrides: Any):
        self.config = with_overrides(type(self).__name__, self.config_class, config, overrides)

    # --- what a subclass provides -------------------------------------------------------

    def queries_per_generator_step(self) -> int:
        raise NotImplementedError

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        """One generator update; returns values worth logging."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """What the attack used (e.g. which explanation), for the result."""
        return {}

    def clone_query_explanation(self) -> Any:
        """What clone-step queries ask for besides predictions (None: nothing)."""
        return None

    def replays_maps(self) -> bool:
        """Whether stored answers keep their explanation maps for replay."""
        return False

    # --- setting up -----------------------------------------------------------------------

    def iteration_cost(self) -> int:
        """Queries one `step` spends."""
        c = self.config
        return c.batch_size * (
            c.generator_steps * self.queries_per_generator_step() + c.clone_steps
        )

    def setup(self, oracle: Oracle, iterations: int) -> None:
        """Build models, optimisers and schedules for a run of `iterations` steps."""
        c = self.config
        channels, size, _ = oracle.input_shape
        torch.manual_seed(c.seed)
        self.rng = accel.attacker_generator(c)
        self.clone_arch = c.clone or default_clone_arch(oracle.input_shape)
        layout = accel.uses_channels_last(c)
        self.clone = fast_layout(
            build_classifier(self.clone_arch, oracle.num_classes, channels, size),
            c.device,
            layout,
        )
        self.generator_shape = (size, channels)
        self.generator = fast_layout(self.new_generator(), c.device, layout)
        self._passes: dict[str, tuple[Any, Any]] = {}
        self.clone_opt, self.generator_opt = optimisers(c, self.clone, self.generator)
        self.clone_sched, self.generator_sched = step_schedules(
            c, iterations, self.clone_opt, self.generator_opt
        )
        self.replay_buffer = (
            ReplayBuffer(
                c.replay_size,
                oracle.input_shape,
                oracle.num_classes,
                c.replay_policy,
                maps=self.replays_maps(),
                device=c.device if c.on_device else "cpu",
            )
            if c.replay_size > 0
            else None
        )
        self.clone_ema_model = new_weight_average(self.clone) if c.clone_ema > 0 else None
        self.ema_updates = 0
        self.generator_restarts = 0
        self.clone_updates = 0
        self.generator_updates = 0
        self.queries_at_step = 0

    def clone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The clone's logits, as the speed settings compute them (float32)."""
        return self._pass("clone", self.clone)(x)

    def generator_pre_activation(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's values before tanh, as the speed settings compute them (float32)."""
        return self._pass("generator", self.generator.pre_activation)(z)

    def _pass(self, name: str, function: Any) -> Any:
        # Made once per model (compiling is slow), again if the model was replaced.
        made = self._passes.get(name)
        if made is None or made[0] != function:
            made = (function, accel.forward_pass(function, self.config))
            self._passes[name] = made
        return made[1]

    def new_generator(self) -> nn.Module:
        """A freshly initialised query generator for this attack (default layout, on the CPU)."""
        c = self.config
        size, channels = self.generator_shape
        return build_generator("generator_a", size, channels, c.nz, c.ngf)

    # --- one iteration --------------------------------------------------------------------

    def step(self, oracle: Oracle) -> dict[str, Any]:
        """One iteration: generator updates, then clone updates on fresh queries."""
        c = self.config
        # Where the run stands, as the oracle counts it: restarts and the disagreement
        # switch are placed by queries spent.
        self.queries_at_step = int(oracle.queries_used)
        self.restart_generator_if_due(self.queries_at_step)
        self.clone.train()
        self.generator.train()
        info: dict[str, Any] = {}
        for _ in range(c.generator_steps):
            info = self.generator_step(oracle)
        for _ in range(c.clone_steps):
            info["clone_loss"] = self.clone_step(oracle)
        return info

    def replay(self, updates: int) -> float | None:
        """`updates` clone updates on stored answers (no queries); the last loss, if any."""
        if self.replay_buffer is None or len(self.replay_buffer) == 0:
            return None
        loss = None
        for _ in range(updates):
            batch = self.replay_buffer.sample_batch(
                self.config.batch_size, self.rng, self.config.device
            )
            loss = self.clone_update(batch["images"], batch["probs"], stored=batch)
        return loss

    def end_iteration(self) -> None:
        """Advance the learning-rate schedules by one iteration."""
        self.clone_sched.step()
        self.generator_sched.step()

    def restart_generator_if_due(self, spent: int) -> None:
        """Re-draw the generator once `spent` passes the next multiple of the restart period."""
        every = self.config.generator_restart_every
        if not every or spent // every <= self.generator_restarts:
            return
        self.generator_restarts = spent // every
        # Its own seed per restart, so a run (and a resumed run) re-draws the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                self.config.seed * 1_000_003 + self.generator_restarts
            )
            fresh = self.new_generator()
        self.generator.load_state_dict(fresh.state_dict())
        # The same parameter tensors: clearing Adam's moments is a fresh optimiser, and the
        # learning-rate schedule keeps its place.
        self.generator_opt.state.clear()

    def clone_step(self, oracle: Oracle) -> float:
        c = self.config
        with torch.no_grad():
            _, x = self.generate(self.sample_latent(c.batch_size))
        answer = self.ask(oracle, x, self.clone_query_explanation())
        probs = answer.probabilities.to(c.device)
        self.observe(x, probs, answer)
        return self.clone_update(x, probs, answer)

    def finish_generator_step(
        self,
        objective: torch.Tensor,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Answer | None,
        info: dict[str, Any],
    ) -> dict[str, Any]:
        """The end every generator step shares: descend on `objective`, then keep the paid
        answers (x, probs) for replay and train the clone on them if asked to."""
        self.generator_opt.zero_grad(set_to_none=True)
        self.clone_opt.zero_grad(set_to_none=True)
        objective.backward()
        self.generator_opt.step()
        self.generator_updates += 1
        self.clone_opt.zero_grad(set_to_none=True)
        self.observe(x, probs, answer)
        if self.config.train_on_generator_queries:
            info["generator_query_loss"] = self.clone_update(x, probs, answer)
        return info

    # --- pieces the attacks use -----------------------------------------------------------

    def ask(self, oracle: Oracle, x: torch.Tensor, explanation: Any = None) -> Answer:
        """Send images `x` to the oracle (with `explanation`, if any): every query an
        attack makes goes through here, so an attack that adapts to a defence changes how
        it asks in one place. Images go from the host, or from the attacker's device to an
        oracle that answers there (`query_device`: an in-process oracle on that device)."""
        images = x.detach()
        if not accel.same_device(images.device, getattr(oracle, "query_device", "cpu")):
            images = images.cpu()
        if explanation is None or explanation is False:
            return oracle.query(images)
        return oracle.query(images, explanation=explanation)

    def sample_latent(self, n: int) -> torch.Tensor:
        return self.draw_normal(n, self.config.nz)

    def draw_normal(self, *shape: int) -> torch.Tensor:
        """Standard normal values from the attack's generator, on the attacker's device."""
        rng = self.rng
        return torch.randn(*shape, generator=rng, device=rng.device).to(self.config.device)

    def generate(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activation, query image in [0, 1]) at the victim's size, in float32 (also
        when the generator runs under bf16 autocast: queries are float32)."""
        pre = self.generator_pre_activation(z)
        return pre, self.to_query(pre, z)

    def to_query(self, pre: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Images from pre-activations (one latent per image, or per image group)."""
        image = self.generator.to_image(pre)
        lo, hi = (float(g) for g in self.config.query_gamma)
        if lo == hi == 1.0:
            return image
        # The latent's last value, through the normal CDF, picks gamma uniformly in [lo, hi].
        u = 0.5 * (1 + torch.erf(z[:, -1] / math.sqrt(2)))
        gamma = (lo + (hi - lo) * u).to(image.device)
        gamma = gamma.repeat_interleave(image.shape[0] // z.shape[0]).view(-1, 1, 1, 1)
        # Clamped away from 0: the gradient of x^gamma at 0 is infinite for gamma < 1.
        return image.clamp_min(1e-6).pow(gamma)

    def eval_model(self) -> nn.Module:
        """The clone that is evaluated and returned: its weight average when clone_ema > 0."""
        return self.clone_ema_model if self.clone_ema_model is not None else self.clone

    def clone_loss(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Answer | None = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The clone's training loss on images `x` answered with `probs`; `answer` (fresh)
        or `stored` (a replayed batch's other fields) may carry more to learn from."""
        return disagreement(self.clone_forward(x), probs, self.config.loss).mean()

    def clone_update(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        answer: Answer | None = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> float | torch.Tensor:
        """One clone optimiser step on answered images (fresh, replayed or generator's)."""
        loss = self.clone_loss(x, probs, answer, stored)
        self.clone_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clone_opt.step()
        self.clone_updates += 1
        if self.clone_ema_model is not None:
            self.ema_updates += 1
            warmed_weight_average(
                self.clone_ema_model, self.clone, self.config.clone_ema, self.ema_updates
            )
        return accel.logged(loss, self.config)

    def observe(self, x: torch.Tensor, probs: torch.Tensor, answer: Answer | None = None) -> None:
        """Remember answered queries for replay (they were paid for once)."""
        if self.replay_buffer is not None:
            self.replay_buffer.add(x, probs, self.rng)

    def disagreement_now(self) -> float:
        """The disagreement term's weight at this point of the run."""
        c = self.config
        if c.disagreement_until and self.queries_at_step >= c.disagreement_until:
            return 0.0
        return float(c.disagreement_weight)

    @staticmethod
    def latent_classes(z: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The class a latent asks for: argmax of its first K values (uniform over classes).

        A function of z, so the generator can learn which images to make for which class.
        """
        return z[:, :num_classes].argmax(dim=1)

    def balance_term(self, clone_logits: torch.Tensor) -> torch.Tensor:
        """Entropy of the batch-mean clone prediction (high when classes are evenly hit)."""
        mean = F.softmax(clone_logits, dim=1).mean(dim=0)
        return -(mean * mean.clamp_min(LOG_EPS).log()).sum()

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (models, optimisers, RNGs)."""
        state = {
            "clone": self.clone.state_dict(),
            "generator": self.generator.state_dict(),
            "clone_opt": self.clone_opt.state_dict(),
            "generator_opt": self.generator_opt.state_dict(),
            "clone_sched": self.clone_sched.state_dict(),
            "generator_sched": self.generator_sched.state_dict(),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "generator_restarts": self.generator_restarts,
            "clone_updates": self.clone_updates,
            "generator_updates": self.generator_updates,
        }
        if self.replay_buffer is not None:
            state["replay"] = self.replay_buffer.state_dict()
        if self.clone_ema_model is not None:
            state["clone_ema"] = self.clone_ema_model.state_dict()
            state["ema_updates"] = self.ema_updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clone.load_state_dict(state["clone"])
        self.generator.load_state_dict(state["generator"])
        self.clone_opt.load_state_dict(state["clone_opt"])
        self.generator_opt.load_state_dict(state["generator_opt"])
        self.clone_sched.load_state_dict(state["clone_sched"])
        self.generator_sched.load_state_dict(state["generator_sched"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.generator_restarts = int(state["generator_restarts"])
        self.clone_updates = int(state["clone_updates"])
        self.generator_updates = int(state["generator_updates"])
        if self.replay_buffer is not None:
            self.replay_buffer.load_state_dict(state["replay"])
        if self.clone_ema_model is not None:
            self.clone_ema_model.load_state_dict(state["clone_ema"])
            self.ema_updates = int(state["ema_updates"])

    def describe(self) -> dict[str, Any]:
        """The attack's settings as plain JSON values (what a run folder's config.json holds)."""
        out: dict[str, Any] = {"method": self.name, "iteration_cost": self.iteration_cost()}
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            out[f.name] = value
        return out
