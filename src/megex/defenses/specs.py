"""Defences by name: the registry, the specs that build them and their description."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import Defense
from .explanation import (
    Coarsen,
    ExplanationSign,
    ExplanationTopK,
    GaussianNoise,
    LaplaceNoise,
    PredictedClassOnly,
    Quantize,
    SmoothGradDefense,
    Withhold,
)
from .prediction import LabelOnly, ReverseSigmoid, RoundProbabilities, TopClasses

__all__ = ["DEFENSES", "build_defense", "build_defenses", "describe_defenses"]

# The registry: name -> class; "noise" is the name `gaussian` had first.
DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        RoundProbabilities,
        TopClasses,
        LabelOnly,
        ReverseSigmoid,
        GaussianNoise,
        LaplaceNoise,
        Quantize,
        ExplanationTopK,
        ExplanationSign,
        PredictedClassOnly,
        SmoothGradDefense,
        Coarsen,
        Withhold,
    )
}
_ALIASES = {"noise": "gaussian"}
DEFENSES["noise"] = GaussianNoise


def describe_defenses() -> list[dict[str, Any]]:
    """Every defence: name, aliases, side, summary, keeps_label (prediction side) and its
    parameters (name, type, default, rule, help), in the registry's order."""
    out = []
    for name, cls in DEFENSES.items():
        if name in _ALIASES:
            continue
        entry: dict[str, Any] = {
            "name": name,
            "aliases": sorted(a for a, target in _ALIASES.items() if target == name),
            "side": cls.side,
            "summary": cls.summary,
            "params": [p.describe() for p in cls.parameters()],
        }
        if cls.side == "prediction":
            # reverse-sigmoid keeps the label only with keep_label (its default).
            entry["keeps_label"] = bool(cls().keeps_label)
        out.append(entry)
    return out


def build_defense(spec: str) -> Defense:
    """A defence from its spec: 'name', 'name:value' (its first parameter, e.g. 'round:2',
    'noise:0.5', 'topk:0.1') or 'name:param=value,param=value' (e.g. 'laplace:scale=0.5',
    'quantize:bits=4', 'reverse-sigmoid:beta=0.5,gamma=0.2'). Raises ValueError naming the
    defence, the parameter and what was expected (read from the parameter's field)."""
    if not isinstance(spec, str):
        raise ValueError(f"defense: expected a spec such as 'round:2', got {spec!r}")
    head, colon, body = spec.strip().partition(":")
    name = head.strip().lower().replace("_", "-")
    if name not in DEFENSES:
        raise ValueError(
            f"defense: unknown {head.strip()!r}; expected one of "
            f"{', '.join(n for n in DEFENSES if n not in _ALIASES)} (megex defenses lists them)"
        )
    cls = DEFENSES[name]
    body = body.strip()
    if not body:
        if colon:
            raise ValueError(f"defense {name!r}: nothing after ':' in {spec!r}")
        return cls()
    return cls(**_spec_values(cls, name, body))


def _spec_values(cls: type[Defense], name: str, body: str) -> dict[str, str]:
    """The parameters' texts in a spec's `body` (what follows 'name:'), by name."""
    declared = [p.name for p in cls.parameters()]
    if not declared:
        raise ValueError(f"defense {name!r} takes no parameters, got {body!r}")
    if "=" not in body:
        return {declared[0]: body}
    values: dict[str, str] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not value.strip():
            raise ValueError(
                f"defense {name!r}: expected param=value pairs separated by commas, "
                f"got {item.strip()!r}"
            )
        if key in values:
            raise ValueError(f"defense {name!r}: parameter {key!r} given twice")
        if key not in declared:
            raise ValueError(
                f"defense {name!r}: unknown parameter {key!r}; expected {', '.join(declared)}"
            )
        values[key] = value.strip()
    return values


def build_defenses(specs: Iterable[str]) -> list[Defense]:
    """Defences from specs, in order (the order in which they are applied)."""
    return [build_defense(spec) for spec in specs]
