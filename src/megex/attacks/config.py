"""Attack settings: frozen dataclasses whose fields carry their group, constraint and help.

One place describes a setting; the validator, `megex attack --set`, its help and the
benchmark's JSON configs all read it from here. Settings stay flat (one unique name each) so
that a name means the same thing on the command line, in a config file and in a run
folder's config.json; the group is metadata, used to lay out help. A config is changed with
`dataclasses.replace`, never in place. The field helpers (:func:`setting`, :class:`Number`,
:class:`Choice`, ...) live in :mod:`megex.settings`, shared with defences and monitors, and
are importable from here as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..explain import Explanation
from ..settings import (
    AT_LEAST_0,
    COUNT,
    COUNT_0,
    FLAG,
    POSITIVE,
    Anything,
    Choice,
    Fractions,
    Number,
    Pair,
    SettingError,
    default_of,
    describe_settings,
    setting,
    validate,
)

__all__ = [
    "AT_LEAST_0",
    "COUNT",
    "COUNT_0",
    "FLAG",
    "POSITIVE",
    "Anything",
    "AttackConfig",
    "Choice",
    "Fractions",
    "Number",
    "Pair",
    "SettingError",
    "describe_settings",
    "parse_setting",
    "setting",
    "validate",
    "with_overrides",
]


@dataclass(frozen=True)
class AttackConfig:
    """Settings every attack shares. Architecture and clone optimiser are DFME's; the loop's
    options are measured in docs/results/, and `presets.DFME_PAPER` holds DFME's
    published values."""

    # --- models ---
    clone: str | None = setting(
        None, "clone architecture (default: picked from the image size)", group="models"
    )
    nz: int = setting(256, "generator latent size", COUNT, "models")
    ngf: int = setting(64, "generator width", COUNT, "models")
    # --- optimisers ---
    batch_size: int = setting(128, "images per query batch and clone update", COUNT, "optim")
    clone_lr: float = setting(0.1, "clone SGD learning rate", POSITIVE, "optim")
    clone_momentum: float = setting(0.9, "clone SGD momentum", Number(0, 1), "optim")
    clone_weight_decay: float = setting(5e-4, "clone weight decay", AT_LEAST_0, "optim")
    generator_lr: float = setting(1e-2, "generator Adam learning rate", POSITIVE, "optim")
    lr_schedule: str = setting(
        "constant",
        "'multistep' (DFME's decays at fractions of the run, so results depend on the budget) "
        "or 'constant' (one run measures every smaller budget on its way)",
        Choice(("constant", "multistep")),
        "optim",
    )
    lr_milestones: tuple[float, ...] = setting(
        (0.1, 0.3, 0.5), "multistep decay points, as fractions of the run", Fractions(), "optim"
    )
    lr_gamma: float = setting(0.3, "multistep decay factor", POSITIVE, "optim")
    clone_ema: float = setting(
        0.0,
        "evaluate an exponential moving average of the clone's weights with this decay "
        "(what a decaying learning rate gives, without knowing the budget); 0: off",
        Number(0, 1, high_open=True),
        "optim",
    )
    # --- how queries and compute are spent ---
    generator_steps: int = setting(1, "generator updates per iteration", COUNT_0)
    clone_steps: int = setting(
        1, "batches of fresh generator queries sent to train the clone, per iteration", COUNT
    )
    train_on_generator_queries: bool = setting(
        True, "also train the clone on the generator step's answers (already paid for)", FLAG
    )
    clone_updates_per_1k_queries: float = setting(
        25.0,
        "clone updates per 1,000 queries spent, all kinds together (fresh, generator's "
        "answers, replayed answers): the free compute every method gets per query; the "
        "updates that answers do not cover are replayed from stored answers (fresh answers "
        "are always learnt from, so a small batch can exceed it). 0: only the updates on "
        "fresh answers",
        AT_LEAST_0,
    )
    replay_size: int = setting(
        100_000, "answered queries kept for replay (MAZE, CaBaGE); 0: none", COUNT_0
    )
    replay_policy: str = setting(
        "reservoir",
        "'ring' keeps the newest answers; 'reservoir' a uniform sample of all of them",
        Choice(("reservoir", "ring")),
    )
    generator_restart_every: int = setting(
        0,
        "re-draw the generator (fresh weights and optimiser state) every this many queries: "
        "a late generator makes queries the victim is sure of; 0: never",
        COUNT_0,
    )
    # --- the generator's objective ---
    loss: str = setting(
        "l1",
        "clone-victim distance: 'l1' on recovered logits, or 'kl'",
        Choice(("l1", "kl")),
        "objective",
    )
    disagreement_weight: float = setting(
        1.0,
        "weight of the generator's disagreement objective (the papers': 1)",
        AT_LEAST_0,
        "objective",
    )
    disagreement_until: int = setting(
        0,
        "queries after which the disagreement term is dropped; 0: never",
        COUNT_0,
        "objective",
    )
    victim_confidence: float = setting(
        1.0,
        "weight of the victim-guided term: the generator also raises the victim's "
        "log-probability of a class its latent picks (DAFL's one-hot loss); 0: off",
        AT_LEAST_0,
        "objective",
    )
    class_balance: float = setting(
        0.0,
        "reward an even spread of the clone's classes over a batch (clone only, no queries)",
        AT_LEAST_0,
        "objective",
    )
    query_gamma: tuple[float, float] = setting(
        (1.0, 1.0),
        "a brightness prior, an assumption about the domain: each query image is raised to "
        "a power drawn from [LOW, HIGH] by its latent; (1, 1): none (data-free)",
        Pair(0.0),
        "objective",
    )
    # --- the run ---
    seed: int = setting(0, "seed of every random choice of the attack", COUNT_0, "run")
    device: str = setting("cpu", "torch device of the attacker's models", group="run")
    # --- speed (megex.accel): off by default, so CPU runs and their results are unchanged ---
    precision: str = setting(
        "fp32",
        "'bf16': the clone's and the generator's forward passes under bf16 autocast "
        "(channels-last off the CPU); the victim, the queries, DFME's probe losses, the "
        "map-matching loss and the optimisers stay fp32",
        Choice(("fp32", "bf16")),
        "speed",
    )
    compile: str = setting(
        "off",
        "torch.compile the clone's and the generator's forward passes with this mode "
        "('reduce-overhead' adds CUDA graphs); the map-matching loss stays eager",
        Choice(("off", "default", "reduce-overhead", "max-autotune")),
        "speed",
    )
    on_device: bool = setting(
        False,
        "keep the attacker's random draws, replay buffer and logged losses on its device and "
        "send queries from there (no copy to the host for an oracle that answers on the same "
        "device; the oracle's check of the images is then the one wait for the device): "
        "off a CPU, draws differ from the host generator's, and so do results",
        FLAG,
        "speed",
    )
    lr_scaling: str = setting(
        "none",
        "scale both learning rates with batch_size / 256 (DFME's batch): 'linear', 'sqrt', "
        "or 'none'",
        Choice(("none", "linear", "sqrt")),
        "speed",
    )

    def __post_init__(self) -> None:
        # JSON gives lists where the fields hold tuples.
        for name in ("lr_milestones", "query_gamma"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        validate(self)

    def check_combination(self) -> None:
        if self.clone_updates_per_1k_queries > 0 and self.replay_size < 1:
            raise SettingError(
                "clone_updates_per_1k_queries > 0 needs replay_size >= 1 (the updates that "
                "fresh answers do not cover are replayed); set it to 0 for none"
            )


def with_overrides(owner: str, config_class: type, config: Any, overrides: dict[str, Any]) -> Any:
    """An attack's config: `config` (default: `config_class()`) with `overrides` replaced;
    TypeError, naming `owner`, for a config of another class or an unknown setting."""
    config = config if config is not None else config_class()
    if not isinstance(config, config_class):
        raise TypeError(
            f"{owner}: config must be a {config_class.__name__}, got {type(config).__name__}"
        )
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"{owner}: unknown setting {unknown[0]!r}; settable: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(config, **overrides) if overrides else config


def parse_setting(config_class: type, name: str, text: str) -> Any:
    """A setting's value from text, typed by its default (the shape `--set NAME=VALUE` takes)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if name not in fields:
        raise SettingError(f"unknown setting {name!r}; settable: {', '.join(sorted(fields))}")
    f = fields[name]
    default = default_of(f)
    text = text.strip()
    if name == "explanation" or isinstance(default, Explanation):
        raise SettingError(f"{name}: set it with --explanation-method/-target/-output")
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SettingError(f"{name}: expected true or false, got {text!r}")
    if default is None and text.lower() in ("none", "null", ""):
        return None
    if isinstance(default, tuple):
        try:
            return tuple(float(v) for v in text.strip("()[] ").split(","))
        except ValueError:
            raise SettingError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if isinstance(default, int):
        try:
            number = float(text.replace("_", ""))
        except ValueError:
            raise SettingError(f"{name}: expected a whole number, got {text!r}") from None
        if not number.is_integer():
            raise SettingError(f"{name}: expected a whole number, got {text!r}")
        return int(number)
    if isinstance(default, float):
        try:
            return float(text.replace("_", ""))
        except ValueError:
            raise SettingError(f"{name}: expected a number, got {text!r}") from None
    return text
