"""What the attacks with images share: a pool of the attacker's unlabelled images, a store
of every answer, and a clone trained on the answers at the compute the loop allots.

An attack with images is `setup(oracle, iterations)`, `step(oracle)` (choose
`query_batch` images, ask the service, keep the answers), `replay(n)` (n clone updates on
batches drawn from every answer so far: the loop calls it with the updates the queries pay
for, `clone_updates_per_1k_queries`), `state_dict` / `load_state_dict` and `eval_model`, the
same protocol as the data-free attacks (:mod:`megex.engine.protocol`). It spends queries only
through the oracle and never reads a label of the pool: the victim's answers are its labels.
A subclass says which images to send next (`next_queries`) and, for the maps variants,
asks for explanations and learns them too (`explanation`, `explanation_loss`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..explain import Explanation
from ..models import build_classifier
from ..oracle import Answer, Oracle
from ..settings import validate
from .answers import AnswerStore
from .base import default_clone_arch
from .config import (
    AT_LEAST_0,
    COUNT,
    COUNT_0,
    POSITIVE,
    Choice,
    Number,
    SettingError,
    setting,
    with_overrides,
)
from .maps import (
    explained_class,
    log_probability_gradients,
    map_matching_loss,
    relative_map_error,
)
from .training import LOG_EPS, disagreement, new_weight_average, warmed_weight_average

# The largest value a float16 holds: the answer store's maps.
FLOAT16_MAX = torch.finfo(torch.float16).max

__all__ = ["PoolAttack", "PoolAttackConfig", "PoolMapsConfig", "PoolMapsMixin", "pool_tensor"]


@dataclass(frozen=True)
class PoolAttackConfig:
    """Settings every attack with images shares: the clone, its optimiser, how many images
    go in one request, and the clone updates per query (the same for every method)."""

    clone: str | None = setting(
        None, "clone architecture (default: picked from the image size)", group="models"
    )
    batch_size: int = setting(64, "answered images per clone update", COUNT, "optim")
    clone_optimizer: str = setting(
        "adam", "the clone's optimiser", Choice(("adam", "sgd")), "optim"
    )
    clone_lr: float = setting(1e-3, "clone learning rate", POSITIVE, "optim")
    clone_momentum: float = setting(0.9, "clone SGD momentum (sgd only)", Number(0, 1), "optim")
    clone_weight_decay: float = setting(0.0, "clone weight decay", AT_LEAST_0, "optim")
    clone_ema: float = setting(
        0.0,
        "evaluate an exponential moving average of the clone's weights with this decay; 0: off",
        Number(0, 1, high_open=True),
        "optim",
    )
    query_batch: int = setting(50, "images sent to the service per step", COUNT)
    training: str = setting(
        "after-queries",
        "when the clone learns: 'after-queries' (Knockoff Nets' and ART's way: every query of "
        "the run first, then all the run's clone updates on the answers; a run measures its "
        "own budget only) or 'streaming' (the updates follow the queries as they are paid for, "
        "so one run measures every smaller budget on its way, and the clone can choose the "
        "next queries)",
        Choice(("after-queries", "streaming")),
        "optim",
    )
    sampling: str = setting(
        "balanced",
        "which answers a clone update draws: 'balanced' (those used least so far, so that "
        "every answer is learnt from about equally often, as in epochs over the answers) or "
        "'uniform' (uniformly, with replacement: early answers are learnt from far more often)",
        Choice(("balanced", "uniform")),
        "optim",
    )
    clone_updates_per_1k_queries: float = setting(
        2000.0,
        "clone updates per 1,000 queries spent, each on a batch drawn from every answer so "
        "far: the compute every method with images gets per query",
        POSITIVE,
    )
    loss: str = setting(
        "kl",
        "clone-victim distance: 'kl' (soft labels, as Knockoff Nets) or 'l1' on recovered logits",
        Choice(("kl", "l1")),
        "objective",
    )
    seed: int = setting(0, "seed of every random choice of the attack", COUNT_0, "run")
    device: str = setting("cpu", "torch device of the attacker's clone", group="run")

    # What the loop's protocol reads of every attack: one request per step.
    clone_steps = 1

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class PoolMapsConfig:
    """What a maps variant adds: the explanation it asks for, and how much its clone
    learns from the maps (the same input-gradient matching as MEGEX's clone)."""

    explanation: Explanation | None = setting(
        None,
        "the explanation to ask the service for (None: whatever it offers by default)",
        group="maps",
    )
    explanation_loss: float = setting(
        1.0,
        "weight of matching the clone's input gradients of log-probabilities to the maps "
        "(relative squared error; one random projection over classes per update for maps "
        "of every class); 0: predictions only",
        AT_LEAST_0,
        "maps",
    )

    def check_combination(self) -> None:
        if self.explanation is not None and not isinstance(self.explanation, Explanation):
            raise SettingError(
                f"explanation: expected an Explanation or None, got {self.explanation!r}"
            )


def pool_tensor(pool: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """(images, description) of an attacker's pool: a megex.pools.Pool, or images as a
    float tensor in [0, 1] of shape (N, C, H, W)."""
    images = getattr(pool, "images", pool)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(
            "pool: expected a megex.pools.Pool or images (N, C, H, W) as a tensor, "
            f"got {type(pool).__name__}"
        )
    images = images.detach().float().cpu().contiguous()
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("pool: images must be in [0, 1]")
    if hasattr(pool, "describe"):
        return images, dict(pool.describe())
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    return images, {"spec": "tensor", "size": int(images.shape[0]), "sha256": digest}


class PoolAttack:
    """Base class of the attacks with images: subclasses set `name`, `config_class` and
    `next_queries`."""

    name = "pool-attack"
    config_class: type = PoolAttackConfig
    generator_updates = 0

    def __init__(self, pool: Any, config: Any = None, **overrides: Any):
        self.config = with_overrides(type(self).__name__, self.config_class, config, overrides)
        self.pool, self.pool_description = pool_tensor(pool)

    # --- what a subclass provides ---------------------------------------------------------

    def next_queries(self) -> torch.Tensor:
        """The `query_batch` images to send next."""
        raise NotImplementedError

    def explanation_request(self) -> Any:
        """What to ask for besides predictions (None: nothing)."""
        return None

    def setup_selection(self, iterations: int) -> None:
        """Prepare the choice of queries for a run of `iterations` steps."""

    def selection_state(self) -> dict[str, Any]:
        return {}

    def load_selection_state(self, state: dict[str, Any]) -> None:
        pass

    # --- the loop's protocol ----------------------------------------------------------------

    def iteration_cost(self) -> int:
        return int(self.config.query_batch)

    def queries_per_generator_step(self) -> int:
        return 0

    def setup(self, oracle: Oracle, iterations: int) -> None:
        c = self.config
        channels, size, _ = oracle.input_shape
        if tuple(self.pool.shape[1:]) != tuple(oracle.input_shape):
            raise ValueError(
                f"pool: images of shape {tuple(self.pool.shape[1:])}, but the victim takes "
                f"{tuple(oracle.input_shape)}"
            )
        torch.manual_seed(c.seed)
        self.rng = torch.Generator().manual_seed(c.seed)
        self.num_classes = oracle.num_classes
        self.clone_arch = c.clone or default_clone_arch(oracle.input_shape)
        self.clone = build_classifier(self.clone_arch, oracle.num_classes, channels, size)
        self.clone.to(c.device)
        if c.clone_optimizer == "adam":
            self.clone_opt: torch.optim.Optimizer = torch.optim.Adam(
                self.clone.parameters(), lr=c.clone_lr, weight_decay=c.clone_weight_decay
            )
        else:
            self.clone_opt = torch.optim.SGD(
                self.clone.parameters(),
                lr=c.clone_lr,
                momentum=c.clone_momentum,
                weight_decay=c.clone_weight_decay,
            )
        self.clone_ema_model = new_weight_average(self.clone) if c.clone_ema > 0 else None
        self.ema_updates = 0
        self.clone_updates = 0
        self.store = AnswerStore(oracle.input_shape, oracle.num_classes)
        self.explanation_used: Explanation | None = None
        self.iterations = int(iterations)
        self.steps_done = 0
        self.setup_selection(iterations)

    def step(self, oracle: Oracle) -> dict[str, Any]:
        """One request: the next images, the service's answers, kept for training."""
        x = self.next_queries().to(self.config.device)
        request = self.explanation_request()
        answer = oracle.query(x.cpu()) if request is None else oracle.query(x.cpu(), request)
        self.keep(x, answer)
        self.steps_done += 1
        return {}

    def keep(self, x: torch.Tensor, answer: Answer) -> None:
        probs = answer.probabilities.float()
        if self.explanation_request() is None:
            self.store.add(x, probs)
            return
        if answer.explanation is None or answer.explanation_spec is None:
            raise RuntimeError(f"{self.name}: the oracle returned no explanation; it needs one")
        spec = answer.explanation_spec
        if self.explanation_used is not None and spec != self.explanation_used:
            raise RuntimeError(
                f"{self.name}: the service explained with {spec.describe()}, earlier with "
                f"{self.explanation_used.describe()}"
            )
        dlogp = self.map_gradients(answer, x.detach().cpu())
        if dlogp.dim() == 5:
            # A class the victim puts below LOG_EPS is flat in the clone's loss (its log p is
            # clamped there): left out of the map term, as unknown, whatever the maps' output
            # (log_probability_gradients already leaves it out of probability maps).
            likely = (probs >= LOG_EPS).to(dlogp.dtype)
            dlogp = dlogp * likely.view(*likely.shape, 1, 1, 1)
        # The store keeps maps in float16: a map with a value past its range (a sign or
        # quantised map divided by a small p) would be kept as infinite and turn the clone's
        # loss into NaN. That image's map of that class is unknown instead.
        storable = (dlogp.abs() <= FLOAT16_MAX).flatten(dlogp.dim() - 3).all(dim=-1)
        dlogp = torch.where(storable.view(*storable.shape, 1, 1, 1), dlogp, 0.0)
        # The first answer says which maps the service returns (every class, or one).
        self.store.keep_maps(tuple(dlogp.shape[1:]))
        self.explanation_used = spec
        # The class a one-class map explains (maps of every class: the predicted class).
        classes = answer.labels if spec.target == "all" else explained_class(answer)
        self.store.add(x, probs, dlogp, classes)

    def map_gradients(self, answer: Answer, x: torch.Tensor) -> torch.Tensor:
        """d log p / dx read off an answer's maps (log_probability_gradients; a hook for
        attackers that know the maps' magnitudes were changed)."""
        return log_probability_gradients(answer, x)

    def replay(self, updates: int) -> float | None:
        """`updates` clone updates, each on a batch drawn from every answer so far."""
        if len(self.store) == 0 or not self.learning_now():
            return None
        loss = None
        self.clone.train()
        for _ in range(updates):
            batch = self.store.sample(self.config.batch_size, self.rng, self.config.sampling)
            loss = self.clone_update(batch)
        return loss

    def learning_now(self) -> bool:
        """Whether the clone learns now: always when streaming; after the run's last
        request otherwise (the updates the queries paid for are then all made at once)."""
        return self.config.training == "streaming" or self.steps_done >= self.iterations

    def clone_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The clone's loss on a batch of answers (the maps variants add the maps)."""
        d = self.config.device
        x, probs = batch["images"].to(d), batch["probs"].to(d)
        return disagreement(self.clone(x), probs, self.config.loss).mean()

    def clone_update(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.clone_loss(batch)
        self.clone_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clone_opt.step()
        self.clone_updates += 1
        if self.clone_ema_model is not None:
            self.ema_updates += 1
            warmed_weight_average(
                self.clone_ema_model, self.clone, self.config.clone_ema, self.ema_updates
            )
        return float(loss.detach())

    def end_iteration(self) -> None:
        pass

    def eval_model(self) -> nn.Module:
        return self.clone_ema_model if self.clone_ema_model is not None else self.clone

    def details(self) -> dict[str, Any]:
        spec = self.explanation_used
        return {
            "pool": self.pool_description,
            "answers_kept": len(self.store),
            **({"explanation": spec.to_dict()} if spec is not None else {}),
        }

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "iteration_cost": self.iteration_cost()}
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        out["pool"] = self.pool_description
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {
            "clone": self.clone.state_dict(),
            "clone_opt": self.clone_opt.state_dict(),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "clone_updates": self.clone_updates,
            "steps_done": self.steps_done,
            "store": self.store.state_dict(),
            "selection": self.selection_state(),
            "explanation_used": (
                self.explanation_used.to_dict() if self.explanation_used is not None else None
            ),
        }
        if self.clone_ema_model is not None:
            state["clone_ema"] = self.clone_ema_model.state_dict()
            state["ema_updates"] = self.ema_updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clone.load_state_dict(state["clone"])
        self.clone_opt.load_state_dict(state["clone_opt"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.clone_updates = int(state["clone_updates"])
        self.steps_done = int(state["steps_done"])
        self.store.load_state_dict(state["store"])
        self.load_selection_state(state["selection"])
        used = state.get("explanation_used")
        self.explanation_used = Explanation.from_dict(used) if used else None
        if self.clone_ema_model is not None:
            self.clone_ema_model.load_state_dict(state["clone_ema"])
            self.ema_updates = int(state["ema_updates"])

    # --- pieces the attacks use -------------------------------------------------------------

    def clone_probabilities(self, images: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """The clone's probabilities on images (eval mode, no gradient), on the CPU."""
        model = self.clone
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], chunk):
                part = images[start : start + chunk].to(self.config.device)
                out.append(F.softmax(model(part), dim=1).cpu())
        model.train(was_training)
        return torch.cat(out)


class PoolMapsMixin:
    """The clone of a maps variant also matches every answered map (Jacobian matching)."""

    def explanation_request(self) -> Any:
        c = self.config
        return c.explanation if c.explanation is not None else True

    def clone_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        if c.explanation_loss <= 0:
            return super().clone_loss(batch)  # type: ignore[misc]
        d = c.device
        x, probs, maps = batch["images"].to(d), batch["probs"].to(d), batch["maps"].to(d)
        # A class whose map is unknown (all zeros) gets weight 0: the clone is not taught a
        # zero gradient for it.
        known = maps.flatten(maps.dim() - 3).ne(0).any(dim=-1).to(maps.dtype)
        if maps.dim() == 5:
            # E_v[(v.(Js - Jv))^2] = ||Js - Jv||^2 for v ~ N(0, I): one backward, unbiased.
            n, k = known.shape
            v = torch.randn(n, k, generator=self.rng).to(d) * known
            target = (v.view(n, k, 1, 1, 1) * maps).sum(dim=1)
        else:
            v = F.one_hot(batch["classes"].to(d), probs.shape[1]).to(maps.dtype)
            v = v * known.view(-1, 1)
            target = maps
        return map_matching_loss(
            self.clone,
            x,
            probs,
            target,
            v,
            self.explanation_used,
            c.loss,
            c.explanation_loss,
            self.map_error,
        )

    def map_error(self, grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per image, how far the clone's input gradient is from the map's (a hook):
        :func:`.maps.relative_map_error`."""
        return relative_map_error(grad, target)
