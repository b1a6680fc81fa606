"""The loop every data-free extraction attack shares.

One iteration = `generator_steps` generator updates (the attack's own `generator_step`,
whose answered queries may train the clone too) then `clone_steps` clone updates on fresh
generator queries, then `replay_steps` clone updates on stored answers (no queries). The
loop owns schedules, evaluation, checkpoints and resume; it spends queries only through the
oracle, checks the remaining budget before each iteration and never asks for more than is
left.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_classifier, build_generator, fast_layout
from ..oracle import Answer, Oracle
from ..runs import RunFolder
from .replay import POLICIES as REPLAY_POLICIES
from .replay import ReplayBuffer

__all__ = [
    "LITERAL",
    "Attack",
    "AttackConfig",
    "AttackResult",
    "default_clone_arch",
    "victim_targets",
]

LOG_EPS = 1e-8


def default_clone_arch(input_shape: tuple[int, int, int]) -> str:
    """A clone that fits the images: small_cnn for 8x8, lenet5 up to 28x28, else ResNet-18-8x."""
    size = input_shape[1]
    if size <= 8:
        return "small_cnn"
    if size <= 28:
        return "lenet5"
    return "resnet18_8x"


def victim_targets(probabilities: torch.Tensor) -> torch.Tensor:
    """DFME's "mean" logit recovery: log p - mean_k log p (defined up to a constant anyway)."""
    logp = probabilities.clamp_min(LOG_EPS).log()
    return logp - logp.mean(dim=1, keepdim=True)


def disagreement(
    clone_logits: torch.Tensor, probabilities: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-image distance between clone and victim: 'l1' on recovered logits, or 'kl'."""
    if loss == "l1":
        return (clone_logits - victim_targets(probabilities)).abs().mean(dim=1)
    p = probabilities.clamp_min(LOG_EPS)
    p = p / p.sum(dim=1, keepdim=True)
    return (p * (p.log() - F.log_softmax(clone_logits, dim=1))).sum(dim=1)


@dataclass
class AttackConfig:
    """Settings shared by every attack.

    Architecture and clone optimiser are DFME's. The loop's settings are the best measured
    on Fashion-MNIST (benchmarks/RESULTS.md, "Ablation"); DFME's literal
    values are noted where they differ, and `LITERAL` holds them all.
    """

    clone: str | None = None  # architecture; None: picked from the image size
    nz: int = 256
    ngf: int = 64
    batch_size: int = 128  # DFME: 256
    generator_steps: int = 1
    clone_steps: int = 1  # DFME: 5 (the generator's queries train the clone too, below)
    clone_lr: float = 0.1
    clone_momentum: float = 0.9
    clone_weight_decay: float = 5e-4
    # DFME: 1e-4, with which the generator hardly moves within a few million queries.
    generator_lr: float = 1e-2
    lr_milestones: tuple[float, ...] = (0.1, 0.3, 0.5)  # fractions of the run
    lr_gamma: float = 0.3
    loss: str = "l1"  # 'l1' (recovered logits) or 'kl'
    seed: int = 0
    device: str = "cpu"
    # --- options beyond the literal port; each one is measured in the benchmark's ablation ---
    # 'multistep': DFME's decays at fractions of the run (so results depend on the budget);
    # 'constant': no decay, so one run measures every smaller budget on its way.
    lr_schedule: str = "constant"  # DFME: 'multistep'
    # Evaluate (and return) an exponential moving average of the clone's weights: what a
    # decaying learning rate gives, without knowing the budget in advance. 0 turns it off.
    clone_ema: float = 0.0
    # Experience replay (MAZE, CaBaGE): keep up to replay_size answered queries and take
    # replay_steps extra clone steps on them per iteration; they cost no queries.
    replay_size: int = 100_000
    replay_steps: int = 5
    # 'ring' keeps the newest replay_size answers; 'reservoir' a uniform sample of all of
    # them, so the clone keeps rehearsing the run's early, more varied queries (MEGEX with a
    # ring stalls at ~79 % on Fashion-MNIST from 100k queries on; a reservoir: 82-83 %).
    replay_policy: str = "reservoir"
    # The generator step's queries are paid for: also take a clone step on their answers.
    train_on_generator_queries: bool = True
    # Generator diversity: reward an even spread of the clone's classes over a batch
    # (entropy of the batch-mean prediction), computed on the clone alone, no queries.
    class_balance: float = 0.0
    # Victim-guided queries (as DAFL's one-hot loss): the generator also raises the victim's
    # log-probability of a target class, the one its latent picks (so queries are
    # class-balanced) when the victim's gradient for every class is known, else the
    # predicted class. MEGEX reads the gradient off the explanation; DFME estimates it from
    # the same zeroth-order queries. No extra queries either way. 0 turns it off.
    victim_confidence: float = 1.0
    # Weight of the generator's disagreement objective (DFME's and MEGEX's: 1). With exact
    # gradients it finds queries the clone gets wrong in ways that do not carry over to
    # real images; victim_confidence is then what keeps the queries useful.
    disagreement_weight: float = 1.0
    # Queries after which the disagreement term is dropped (the victim-guided term stays):
    # it speeds up the start and caps the end (benchmarks/RESULTS.md). 0: never dropped.
    disagreement_until: int = 0
    # The victim-guided term stops rewarding the target class's probability above this
    # cap: the queries then sit near the class, not deep inside it, where answers tell the
    # clone little. 1 keeps pushing all the way.
    confidence_cap: float = 1.0
    # Query mixup: this fraction of each fresh clone-step batch are convex mixes of two
    # generated images (weights uniform in [0, 1]); they probe the regions between the
    # generator's modes at the same query cost. 0 turns it off.
    query_mixup: float = 0.0
    # A brightness prior for the queries: each generated image is raised to a power gamma
    # drawn from this range (a function of its latent, so DFME's perturbed copies share it).
    # Real images have dark and light backgrounds; the generator's final batch norm alone
    # pins every batch near mean intensity 0.5. (1, 1) turns it off.
    query_gamma: tuple[float, float] = (0.5, 4.5)
    # Re-draw the generator (fresh weights, fresh optimiser state) every this many queries:
    # a generator late in a run makes queries the victim is sure of, which teach the clone
    # little; a fresh one makes varied queries again. 0: never.
    generator_restart_every: int = 0

    def validate(self) -> None:
        for name in ("nz", "ngf", "batch_size", "clone_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if int(self.generator_steps) < 0:
            raise ValueError(f"generator_steps: expected >= 0, got {self.generator_steps}")
        for name in ("clone_lr", "generator_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.loss not in ("l1", "kl"):
            raise ValueError(f"loss: expected 'l1' or 'kl', got {self.loss!r}")
        if self.lr_schedule not in ("multistep", "constant"):
            raise ValueError(
                f"lr_schedule: expected 'multistep' or 'constant', got {self.lr_schedule!r}"
            )
        if not 0 <= float(self.clone_ema) < 1:
            raise ValueError(f"clone_ema: expected 0 <= decay < 1, got {self.clone_ema}")
        every = self.generator_restart_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                "generator_restart_every: expected a number of queries >= 0 (0: never), "
                f"got {self.generator_restart_every!r}"
            )
        for name in ("replay_size", "replay_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.replay_policy not in REPLAY_POLICIES:
            raise ValueError(
                f"replay_policy: expected 'ring' or 'reservoir', got {self.replay_policy!r}"
            )
        if int(self.replay_steps) > 0 and int(self.replay_size) < 1:
            raise ValueError("replay_steps > 0 needs replay_size >= 1 (a buffer to replay)")
        lo, hi = (float(g) for g in self.query_gamma)
        if not 0 < lo <= hi:
            raise ValueError(f"query_gamma: expected 0 < low <= high, got {self.query_gamma}")
        if float(self.disagreement_weight) < 0:
            raise ValueError(f"disagreement_weight: expected >= 0, got {self.disagreement_weight}")
        if int(self.disagreement_until) < 0:
            raise ValueError(
                f"disagreement_until: expected a query count >= 0, got {self.disagreement_until}"
            )
        if float(self.victim_confidence) < 0:
            raise ValueError(f"victim_confidence: expected >= 0, got {self.victim_confidence}")
        if not 0 < float(self.confidence_cap) <= 1:
            raise ValueError(f"confidence_cap: expected 0 < cap <= 1, got {self.confidence_cap}")
        if not 0 <= float(self.query_mixup) <= 1:
            raise ValueError(f"query_mixup: expected a fraction in [0, 1], got {self.query_mixup}")
        if self.class_balance is not None and float(self.class_balance) < 0:
            raise ValueError(f"class_balance: expected >= 0, got {self.class_balance}")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"lr_milestones: fractions in (0, 1) expected, got {self.lr_milestones}"
            )


# DFME's settings as published (with every option of this loop off): `Attack(**LITERAL)`.
LITERAL: dict[str, Any] = {
    "batch_size": 256,
    "clone_steps": 5,
    "generator_lr": 1e-4,
    "lr_schedule": "multistep",
    "replay_size": 0,
    "replay_steps": 0,
    "train_on_generator_queries": False,
    "victim_confidence": 0.0,
    "query_gamma": (1.0, 1.0),
}


@dataclass
class AttackResult:
    method: str
    queries_used: int
    clone_accuracy: float | None
    fidelity: float | None
    elapsed_s: float
    iterations: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    clone: nn.Module | None = field(default=None, repr=False)
    finished: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("clone")
        return out


class Attack:
    """Base class: subclasses set `name`, `queries_per_generator_step` and `generator_step`."""

    name = "attack"
    config_class = AttackConfig

    def __init__(self, config: AttackConfig | None = None, **overrides: Any):
        config = config or self.config_class()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"{type(self).__name__}: unknown setting {key!r}")
            setattr(config, key, value)
        config.validate()
        self.config = config
        self.queries_spent = 0  # queries spent before the current iteration (set by run)

    # --- what a subclass provides -------------------------------------------------------

    def queries_per_generator_step(self) -> int:
        raise NotImplementedError

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        """One generator update; returns values worth logging."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """What the attack used (e.g. which explanation), for the result."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State beyond models, optimisers and RNGs; subclasses extend it (call super)."""
        out: dict[str, Any] = {}
        if self.replay is not None:
            out["replay"] = self.replay.state_dict()
        if self.clone_ema_model is not None:
            out["clone_ema"] = self.clone_ema_model.state_dict()
            out["ema_updates"] = self.ema_updates
        return out

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if self.clone_ema_model is not None and "clone_ema" in state:
            self.clone_ema_model.load_state_dict(state["clone_ema"])
            self.ema_updates = int(state["ema_updates"])

    def clone_query_explanation(self) -> Any:
        """What clone-step queries ask for besides predictions (None: nothing)."""
        return None

    # --- the shared loop -----------------------------------------------------------------

    def iteration_cost(self) -> int:
        c = self.config
        return c.batch_size * (
            c.generator_steps * self.queries_per_generator_step() + c.clone_steps
        )

    def setup(self, oracle: Oracle) -> None:
        c = self.config
        channels, size, _ = oracle.input_shape
        torch.manual_seed(c.seed)
        self.rng = torch.Generator(device="cpu").manual_seed(c.seed)
        self.clone_arch = c.clone or default_clone_arch(oracle.input_shape)
        self.clone = fast_layout(
            build_classifier(self.clone_arch, oracle.num_classes, channels, size), c.device
        )
        gen_size = size if size % 4 == 0 else 4 * math.ceil(size / 4)
        self.generator_shape = (gen_size, channels)
        self.generator = fast_layout(self.new_generator(), c.device)
        self.crop = size
        self.clone_opt = torch.optim.SGD(
            self.clone.parameters(),
            lr=c.clone_lr,
            momentum=c.clone_momentum,
            weight_decay=c.clone_weight_decay,
        )
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=c.generator_lr)
        self.replay = (
            ReplayBuffer(c.replay_size, oracle.input_shape, oracle.num_classes, c.replay_policy)
            if c.replay_size > 0
            else None
        )
        self.clone_ema_model = None
        self.ema_updates = 0
        self.generator_restarts = 0
        if c.clone_ema > 0:
            self.clone_ema_model = copy.deepcopy(self.clone).requires_grad_(False)

    def new_generator(self) -> nn.Module:
        """A freshly initialised query generator for this attack (default layout, on the CPU)."""
        c = self.config
        size, channels = self.generator_shape
        return build_generator("generator_a", size, channels, c.nz, c.ngf)

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

    def make_schedulers(self, iterations: int) -> None:
        c = self.config
        milestones = sorted({max(1, int(m * iterations)) for m in c.lr_milestones})
        if c.lr_schedule == "constant":
            milestones = []
        self.clone_sched = torch.optim.lr_scheduler.MultiStepLR(
            self.clone_opt, milestones, c.lr_gamma
        )
        self.generator_sched = torch.optim.lr_scheduler.MultiStepLR(
            self.generator_opt, milestones, c.lr_gamma
        )

    def sample_latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.nz, generator=self.rng).to(self.config.device)

    def generate(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activation, query image in [0, 1]) cropped to the victim's size."""
        pre = self.generator.pre_activation(z)[..., : self.crop, : self.crop]
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
        self, x: torch.Tensor, probs: torch.Tensor, answer: Answer | None = None
    ) -> torch.Tensor:
        """The clone's training loss on images `x` answered with `probs` (and `answer`)."""
        return disagreement(self.clone(x), probs, self.config.loss).mean()

    def clone_update(
        self, x: torch.Tensor, probs: torch.Tensor, answer: Answer | None = None
    ) -> float:
        """One clone optimiser step on answered images (fresh, replayed or generator's)."""
        loss = self.clone_loss(x, probs, answer)
        self.clone_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clone_opt.step()
        if self.clone_ema_model is not None:
            self.ema_updates += 1
            # Warm-up so that the average does not drag the random initial weights along.
            decay = min(self.config.clone_ema, (1 + self.ema_updates) / (10 + self.ema_updates))
            with torch.no_grad():
                for avg, cur in zip(self.clone_ema_model.parameters(), self.clone.parameters()):
                    avg.lerp_(cur, 1 - decay)
                for avg, cur in zip(self.clone_ema_model.buffers(), self.clone.buffers()):
                    avg.copy_(cur)
        return loss.item()

    def observe(self, x: torch.Tensor, probs: torch.Tensor) -> None:
        """Remember answered queries for replay (they were paid for once)."""
        if self.replay is not None:
            self.replay.add(x, probs, self.rng)

    def clone_step(self, oracle: Oracle) -> float:
        c = self.config
        with torch.no_grad():
            _, x = self.generate(self.sample_latent(c.batch_size))
            x = self.mix_queries(x)
        request = self.clone_query_explanation()
        answer = oracle.query(x.cpu(), explanation=request) if request else oracle.query(x.cpu())
        probs = answer.probabilities.to(c.device)
        self.observe(x, probs)
        return self.clone_update(x, probs, answer)

    def disagreement_now(self) -> float:
        """The disagreement term's weight at this point of the run."""
        c = self.config
        if c.disagreement_until and self.queries_spent >= c.disagreement_until:
            return 0.0
        return float(c.disagreement_weight)

    def mix_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Replace the first `query_mixup` fraction of a batch by mixes of two of its images."""
        n = int(round(self.config.query_mixup * x.shape[0]))
        if n == 0:
            return x
        other = torch.randperm(x.shape[0], generator=self.rng)[:n].to(x.device)
        lam = torch.rand(n, 1, 1, 1, generator=self.rng).to(x.device)
        mixed = lam * x[:n] + (1 - lam) * x[other]
        return torch.cat([mixed, x[n:]])

    def confidence_mask(self, probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1 where the target class's probability is still below `confidence_cap`, else 0.

        A cap of 1 is no cap: a probability shown as exactly 1.0 (float32 rounding) is kept.
        """
        p = probabilities.gather(1, targets.view(-1, 1)).view(-1)
        if self.config.confidence_cap >= 1:
            return torch.ones_like(p)
        return (p < self.config.confidence_cap).float()

    def replay_step(self) -> float:
        x, probs = self.replay.sample(self.config.batch_size, self.rng, self.config.device)
        return self.clone_update(x, probs)

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

    def state(self, iteration: int, spent: int, metrics: list, elapsed: float) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "queries_spent": spent,
            "elapsed_s": elapsed,
            "metrics": metrics,
            "clone": self.clone.state_dict(),
            "generator": self.generator.state_dict(),
            "clone_opt": self.clone_opt.state_dict(),
            "generator_opt": self.generator_opt.state_dict(),
            "clone_sched": self.clone_sched.state_dict(),
            "generator_sched": self.generator_sched.state_dict(),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "extra": self.extra_state(),
            "generator_restarts": self.generator_restarts,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.clone.load_state_dict(state["clone"])
        self.generator.load_state_dict(state["generator"])
        self.clone_opt.load_state_dict(state["clone_opt"])
        self.generator_opt.load_state_dict(state["generator_opt"])
        self.clone_sched.load_state_dict(state["clone_sched"])
        self.generator_sched.load_state_dict(state["generator_sched"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.load_extra_state(state.get("extra", {}))
        self.generator_restarts = int(state.get("generator_restarts", 0))

    def run(
        self,
        oracle: Oracle,
        budget: int | None = None,
        *,
        evaluator: Any = None,
        eval_every: int | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        callback: Any = None,
        service_state: Any = None,
        eval_at: Any = None,
    ) -> AttackResult:
        """Attack `oracle` with at most `budget` queries (default: all it has left).

        evaluator: called as evaluator(clone) -> {"clone_accuracy", "fidelity", ...} every
        `eval_every` queries (default: a tenth of the budget) and at the end.
        run_dir: a run folder to write config, metrics, checkpoints and the result into;
        with resume=True an existing checkpoint there is continued exactly.
        callback: called as callback(iteration, queries_spent) after every iteration.
        service_state: a callable returning the in-process service's state to store in the
        checkpoint (the CLI uses it so that a resumed LocalOracle continues its ledger).
        eval_at: query counts at which to evaluate as well: after the last iteration that
        stays within each (so a run of budget B reports what a run of budget b < B would,
        when the schedule does not depend on the budget: lr_schedule='constant').
        """
        c = self.config
        remaining = oracle.remaining
        folder = RunFolder(run_dir) if run_dir is not None else None
        if budget is None and resume and folder is not None and folder.config_path.is_file():
            # A resumed run keeps the budget it started with, not what the oracle has left.
            budget = folder.read_config().get("budget")
        if budget is None:
            if not math.isfinite(remaining):
                raise ValueError("budget: the oracle has no budget of its own; pass budget=...")
            budget = int(remaining)
        budget = int(budget)
        if budget < 1:
            raise ValueError(f"budget: expected >= 1, got {budget}")
        cost = self.iteration_cost()
        iterations = budget // cost
        if iterations < 1:
            raise ValueError(
                f"budget: {budget} queries is less than one iteration of {self.name} "
                f"({cost} = batch {c.batch_size} x (generator steps x "
                f"{self.queries_per_generator_step()} + {c.clone_steps} clone steps)); "
                "raise the budget or lower batch_size"
            )
        eval_every = int(eval_every or max(cost, budget // 10))
        self.setup(oracle)
        self.make_schedulers(iterations)
        if folder is not None:
            folder.create()
        start_iteration, spent, metrics, elapsed0 = 0, 0, [], 0.0
        if folder is not None and resume and folder.has_checkpoint():
            state = folder.load_checkpoint()
            self.load_state(state)
            start_iteration, spent = state["iteration"], state["queries_spent"]
            metrics, elapsed0 = list(state["metrics"]), state["elapsed_s"]
        if folder is not None:
            described = self.describe(budget, oracle)
            if resume and folder.has_checkpoint():
                _check_same_settings(folder, described)
            folder.write_config(described)
        next_eval = (spent // eval_every + 1) * eval_every
        marks = sorted(int(b) for b in (eval_at or ()) if int(b) >= cost)
        t0 = time.time() - elapsed0
        bar = _progress_bar(budget, spent, progress, self.name)
        interrupted = False
        stopped = None
        done = start_iteration
        try:
            for iteration in range(start_iteration, iterations):
                if oracle.remaining < cost:
                    stopped = (
                        f"the oracle had {oracle.remaining} queries left, less than one iteration"
                    )
                    break
                self.queries_spent = spent
                self.restart_generator_if_due(spent)
                self.clone.train()
                self.generator.train()
                info: dict[str, Any] = {}
                for _ in range(c.generator_steps):
                    info = self.generator_step(oracle)
                for _ in range(c.clone_steps):
                    info["clone_loss"] = self.clone_step(oracle)
                if self.replay is not None and len(self.replay) > 0:
                    for _ in range(c.replay_steps):
                        info["replay_loss"] = self.replay_step()
                self.clone_sched.step()
                self.generator_sched.step()
                spent += cost
                if bar is not None:
                    bar.update(cost)
                last = iteration + 1 == iterations
                marked = any(spent <= b < spent + cost for b in marks)
                if evaluator is not None and (spent >= next_eval or last or marked):
                    row = {
                        "queries": spent,
                        "elapsed_s": round(time.time() - t0, 2),
                        **evaluator(self.eval_model()),
                    }
                    row.update({k: round(v, 5) for k, v in info.items() if isinstance(v, float)})
                    metrics.append(row)
                    next_eval = (spent // eval_every + 1) * eval_every
                    if bar is not None:
                        bar.set_postfix(acc=f"{row['clone_accuracy']:.3f}")
                    if folder is not None:
                        self._checkpoint(folder, iteration + 1, spent, metrics, t0, service_state)
                done = iteration + 1
                if callback is not None:
                    callback(done, spent)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        if (
            stopped
            and evaluator is not None
            and spent
            and (not metrics or metrics[-1]["queries"] != spent)
        ):
            # Stopped early: the clone as it is at the end still gets its evaluation.
            metrics.append(
                {
                    "queries": spent,
                    "elapsed_s": round(time.time() - t0, 2),
                    **evaluator(self.eval_model()),
                }
            )
        elapsed = time.time() - t0
        # After an interrupt the checkpoint of the last evaluation stands: a half-done
        # iteration cannot be resumed exactly, so it is not saved.
        if folder is not None and not interrupted:
            self._checkpoint(folder, done, spent, metrics, t0, service_state)
        final = metrics[-1] if metrics else {}
        result = AttackResult(
            method=self.name,
            queries_used=spent,
            clone_accuracy=final.get("clone_accuracy"),
            fidelity=final.get("fidelity"),
            elapsed_s=round(elapsed, 2),
            iterations=done,
            metrics=metrics,
            details={
                **self.details(),
                "clone_arch": self.clone_arch,
                "budget": budget,
                **({"stopped_early": stopped} if stopped else {}),
            },
            clone=self.eval_model(),
            finished=not interrupted,
        )
        if folder is not None and not interrupted:
            folder.save_clone(
                self.eval_model(),
                {
                    "arch": self.clone_arch,
                    "input_shape": list(oracle.input_shape),
                    "num_classes": oracle.num_classes,
                },
            )
            folder.write_result(result.to_dict())
        return result

    def _checkpoint(self, folder, iteration, spent, metrics, t0, service_state) -> None:
        state = self.state(iteration, spent, metrics, time.time() - t0)
        if service_state is not None:
            state["service"] = service_state()
        folder.save_checkpoint(state)
        folder.write_metrics(metrics)

    def describe(self, budget: int, oracle: Oracle) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg["lr_milestones"] = list(cfg["lr_milestones"])
        cfg["query_gamma"] = list(cfg["query_gamma"])
        return {
            "method": self.name,
            "budget": budget,
            "iteration_cost": self.iteration_cost(),
            "input_shape": list(oracle.input_shape),
            "num_classes": oracle.num_classes,
            **cfg,
        }


# Settings that may differ between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"device"}


def changed_settings(folder: RunFolder, described: dict[str, Any]) -> list[str]:
    """How `described` differs from the settings a run folder was started with.

    A setting the folder does not record (a run from a version without that option) counts
    as changed: its value then is unknown.
    """
    before = folder.read_config()
    now = json.loads(json.dumps(described, default=str))
    return [
        f"{key}: {before[key]!r} then, {value!r} now"
        if key in before
        else f"{key}: not recorded then, {value!r} now"
        for key, value in now.items()
        if key not in _RESUMABLE_CHANGES and (key not in before or before[key] != value)
    ]


def _check_same_settings(folder: RunFolder, described: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint with other settings: the result would mix two runs."""
    changed = changed_settings(folder, described)
    if changed:
        raise ValueError(
            f"resume: the run in {folder.path} was started with other settings "
            f"({'; '.join(changed)}); resume it with the same settings, or start a new run "
            "folder (the CLI's --force starts this one over)"
        )


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", unit_scale=True, leave=False)
