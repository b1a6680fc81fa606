"""The methods the experiments compare: an attack, its fixed settings, and which method's
searched settings it takes; how a method's settings are put together (shared, searched, fixed,
configured), and the tuned-settings file (megex tune's output) they are searched into.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..attacks import ATTACKS, POOL_ATTACKS
from ..attacks.presets import DFME_PAPER
from ..explain import Explanation
from .config import SHARED_SETTINGS

__all__ = [
    "ASSUMPTIONS",
    "EXPLANATIONS",
    "METHODS",
    "apply_settings_file",
    "build_attack",
    "check_methods",
    "load_tuned",
    "method_settings",
    "one_run_per_budget",
    "require_tuned",
]

# Explanations by name, so configs stay plain JSON.
EXPLANATIONS: dict[str, dict[str, Any]] = {
    "gradient-all": {"method": "gradient", "target": "all"},
    "gradient-predicted": {"method": "gradient", "target": "predicted"},
    "smoothgrad-predicted": {"method": "smoothgrad", "target": "predicted"},
    "smoothgrad-all": {"method": "smoothgrad", "target": "all"},
    "integrated_gradients-all": {"method": "integrated_gradients", "target": "all", "steps": 16},
    "input_x_gradient-all": {"method": "input_x_gradient", "target": "all"},
}

PRIOR = [0.5, 4.5]
# name -> attack, its fixed settings, and (for variants) the method whose tuned settings it takes.
METHODS: dict[str, dict[str, Any]] = {
    "megex-all": {"attack": "megex", "explanation": "gradient-all"},
    "megex-predicted": {"attack": "megex", "explanation": "gradient-predicted"},
    "megex-smoothgrad": {"attack": "megex", "explanation": "smoothgrad-predicted"},
    # DFME's estimator in megex's loop (replay, free clone updates, ...), its settings searched.
    "dfme": {"attack": "dfme"},
    # DFME as published (Truong et al. 2021; presets.DFME_PAPER: no replay, 5 clone steps per
    # iteration) with a constant learning rate (its multistep schedule decays at fractions of
    # a 20M-query run), its generator as wide as published and no weight average (the shared
    # settings' ngf 8 and clone_ema are this loop's), never searched: the literature's DFME.
    "dfme-paper": {
        "attack": "dfme",
        **DFME_PAPER,
        "lr_schedule": "constant",
        "ngf": 64,
        "clone_ema": 0.0,
        "tuned_as": None,
    },
    # DFME with 10 directions per image (11 queries per generator image), as MAZE uses.
    "dfme-m10": {"attack": "dfme", "directions": 10, "tuned_as": "dfme"},
    # The strongest use of the maps: every answered map, fresh or replayed, also trains the
    # clone's input gradients (Jacobian matching); clone queries ask for maps too.
    "megex-jacobian": {
        "attack": "megex",
        "explanation": "gradient-all",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
    "megex-jacobian-predicted": {
        "attack": "megex",
        "explanation": "gradient-predicted",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
    # The same attacker given the other kinds of maps services return (each undone to a
    # gradient where it can be), with the settings searched for megex-jacobian.
    **{
        f"megex-jacobian-{name.split('-')[0]}": {
            "attack": "megex",
            "explanation": name,
            "explain_clone_queries": True,
            "replay_maps": True,
            "tuned_as": "megex-jacobian",
        }
        for name in ("smoothgrad-all", "integrated_gradients-all", "input_x_gradient-all")
    },
    # With a brightness prior: an assumption about the domain (dark or light backgrounds).
    "megex-all+prior": {
        "attack": "megex",
        "explanation": "gradient-all",
        "query_gamma": PRIOR,
        "tuned_as": "megex-all",
    },
    "dfme+prior": {"attack": "dfme", "query_gamma": PRIOR, "tuned_as": "dfme"},
    # Predictions only, without DFME's extra queries: the generator seeks where several
    # clones disagree (no queries); DisGUIDE (softmax spread plus class diversity, soft vote
    # evaluated) and dual students (as the paper: two students, no diversity term).
    "disguide": {"attack": "disguide"},
    "dual-students": {"attack": "dual-students", "clones": 2, "class_balance": 0.0},
    # IDEAL: one clone; before each batch a fresh generator is trained on the clone alone (its
    # confidence in the classes asked for, and their balance), then the batch is sent once.
    "ideal": {"attack": "ideal"},
    # DisGUIDE when the service returns maps: every query asks for them, and every clone
    # matches its input gradients to each map it has paid for, fresh or replayed.
    "disguide-maps": {
        "attack": "disguide-maps",
        "explanation": "gradient-all",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
    "disguide-maps-predicted": {
        "attack": "disguide-maps",
        "explanation": "gradient-predicted",
        "explain_clone_queries": True,
        "replay_maps": True,
    },
}
# A method with maps compared with the same attacker without them, where that is not the
# benchmark's baseline (DFME's estimator is MEGEX's own counterpart): what the maps add to
# that attacker, when both are in the runs.
WITHOUT_MAPS = {"disguide-maps": "disguide", "disguide-maps-predicted": "disguide"}
# Attackers that try to stay under an out-of-distribution query monitor (megex.detection):
# their generator also raises the victim's confidence, they send the images their clone is
# most confident on, and 6 confident padding images after each (6/7 of the budget: on the
# Fashion-MNIST victim, what keeps the first window under the calibrated threshold);
# otherwise the settings searched for the method they evade with.
METHODS.update(
    {
        f"{method}+evasive": {
            **METHODS[method],
            "attack": f"{METHODS[method]['attack']}-evasive",
            "victim_confidence": 1.0,
            "padding_per_query": 6,
            "tuned_as": method,
        }
        for method in ("megex-all", "megex-jacobian", "dfme")
    }
)
# Attackers who hold some images of the domain (a pool; see megex.pools): Knockoff Nets with
# random, uncertainty or k-center choice of pool images, and JBDA; each with and without maps.
METHODS.update(
    {
        "knockoff": {"attack": "knockoff"},
        # ActiveThief's choices, by a clone that learns as the answers come.
        "knockoff-uncertainty": {
            "attack": "knockoff",
            "selection": "uncertainty",
            "training": "streaming",
        },
        "knockoff-kcenter": {"attack": "knockoff", "selection": "kcenter", "training": "streaming"},
        "knockoff-maps": {"attack": "knockoff-maps", "explanation": "gradient-all"},
        "knockoff-maps-predicted": {
            "attack": "knockoff-maps",
            "explanation": "gradient-predicted",
        },
        "jbda": {"attack": "jbda"},
        "jbda-maps": {"attack": "jbda-maps", "explanation": "gradient-all"},
    }
)
ASSUMPTIONS = {
    "+prior": f"queries raised to a power in {PRIOR} (query_gamma): assumes the domain's "
    "images have dark or light backgrounds"
}


def check_methods(names: list[str]) -> None:
    """Refuse a method name that METHODS does not have."""
    for name in names:
        if name not in METHODS:
            raise ValueError(f"method: unknown {name!r}; expected one of {', '.join(METHODS)}")


def load_tuned(config: dict[str, Any]) -> dict[str, Any]:
    """{"methods": {name: settings}, ...} from the search's output file, or {} when none."""
    path = config.get("tuned_settings")
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tuned_settings: no file at {path}; run megex tune to make it, or set "
            '"tuned_settings": null in the config for the untuned package defaults'
        )
    return json.loads(path.read_text())


def apply_settings_file(config: dict[str, Any], settings_file: str | None) -> None:
    """--settings-file: the tuned settings file to read instead of the config's; 'none' for
    the package defaults, untuned; None leaves the config's."""
    if settings_file:
        none = settings_file.strip().lower() == "none"
        config["tuned_settings"] = None if none else settings_file


def method_settings(
    config: dict[str, Any], method: str, tuned: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(attack name, settings): shared, then the method's fixed, tuned and configured ones."""
    spec = dict(METHODS[method])
    attack = spec.pop("attack")
    tuned_as = spec.pop("tuned_as", method)
    # tuned_as None: published settings, never searched.
    searched = ((tuned or {}).get("methods") or {}).get(tuned_as, {}) if tuned_as else {}
    shared = dict(config["settings"])
    if attack in POOL_ATTACKS:
        # The data-free attacks' shared generator and schedule settings mean nothing to an
        # attacker with images (it has no generator; its schedule is constant).
        fields = {f.name for f in dataclasses.fields(ATTACKS[attack].config_class)}
        shared = {k: v for k, v in shared.items() if k in fields or k not in SHARED_SETTINGS}
    settings = {
        **shared,
        **searched,
        **spec,
        **config["method_settings"].get(method, {}),
    }
    return attack, settings


def require_tuned(config: dict[str, Any], method: str, tuned: dict[str, Any] | None) -> None:
    """With a search's output `tuned`, refuse a method whose settings it does not hold (the
    search has not finished it) rather than run it untuned."""
    source = METHODS[method].get("tuned_as", method)
    if tuned and source is not None and source not in (tuned.get("methods") or {}):
        raise ValueError(
            f"tuned_settings: {config['tuned_settings']} has no settings for {source!r} "
            f"(the search has not finished it); run megex tune --methods {source}, or run "
            "untuned, without a settings file"
        )


def one_run_per_budget(attack: str, settings: dict[str, Any]) -> bool:
    """Whether a method measures each budget by a run of its own: an attack with images whose
    clone learns after all of a run's queries (`training` 'after-queries'), so that a run
    tells nothing of smaller budgets on its way."""
    if attack not in POOL_ATTACKS:
        return False
    default = ATTACKS[attack].config_class().training
    return settings.get("training", default) == "after-queries"


def build_attack(attack: str, settings: dict[str, Any], seed: int, device: str, pool: Any = None):
    """The attack with these settings; an attack with images takes the attacker's `pool`."""
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    if "explanation" in settings:
        name = settings["explanation"]
        spec = EXPLANATIONS[name] if isinstance(name, str) else name
        settings["explanation"] = Explanation.from_dict(spec)
    if attack in POOL_ATTACKS:
        if pool is None:
            raise ValueError(f"{attack}: an attack with images needs a pool (the config's 'pool')")
        return ATTACKS[attack](pool, seed=seed, device=device, **settings)
    if pool is not None:
        raise ValueError(f"{attack}: a data-free attack takes no pool")
    return ATTACKS[attack](seed=seed, device=device, **settings)
