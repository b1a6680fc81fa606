"""What every defence shares: parameters declared as dataclass fields, the hooks a service
calls, and the spec and description built from the fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..explain import Explanation
from ..settings import declared, default_of

__all__ = ["SIDES", "Defense", "Param"]

SIDES = ("prediction", "explanation")


@dataclass(frozen=True)
class Param:
    """One parameter of a defence, as its field declares it (:func:`megex.settings.setting`):
    name, type (int, float or bool), default, help and check."""

    name: str
    kind: type
    default: Any
    help: str
    check: Any

    @classmethod
    def of(cls, f: dataclasses.Field) -> Param:
        """The parameter that field `f` declares."""
        check = f.metadata["check"]
        return cls(f.name, check.kind, default_of(f), f.metadata["help"], check)

    @property
    def rule(self) -> str:
        """What a value must be, in words (shown in errors and in `megex defenses`)."""
        return self.check.expected()

    def parse(self, value: Any, defense: str) -> Any:
        """`value` (a Python value, or text from a spec) typed and checked against the rule;
        ValueError names the defence and the parameter."""
        return self.check.parse(value, f"defense {defense!r}: parameter {self.name!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": self.default,
            "rule": self.rule,
            "help": self.help,
        }


@dataclass(frozen=True)
class Defense:
    """A perturbation a service applies to its answers; the base class changes nothing.

    A defence is a frozen dataclass. Subclasses set the class attributes `name`, `side`
    ("prediction" or "explanation") and `summary` (one line), declare their parameters as
    fields made by :func:`megex.settings.setting` (default, help and check; the field order
    is the order of `name:value` specs) and override the hook of their side. The generated
    constructor takes the parameters as values or as text and checks each against its rule,
    raising ValueError that names the defence and the parameter.
    """

    name: ClassVar[str] = "none"
    side: ClassVar[str] = "explanation"
    summary: ClassVar[str] = "returns answers unchanged"
    # Prediction side: whether the victim's predicted class keeps the largest probability.
    keeps_label: ClassVar[bool] = True

    def __new__(cls, *args: Any, **values: Any) -> Defense:
        # The generated constructor would raise a TypeError that does not name the defence.
        names = [f.name for f in declared(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            expected = ", ".join(sorted(names)) if names else "no parameters"
            raise ValueError(
                f"defense {cls.name!r}: unknown parameter {unknown[0]!r}; expected {expected}"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for param in self.parameters():
            # Frozen: the checked value replaces the given one through object's setattr.
            object.__setattr__(self, param.name, param.parse(getattr(self, param.name), self.name))

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        """The declared parameters, in order."""
        return tuple(Param.of(f) for f in declared(cls))

    # --- the hooks ----------------------------------------------------------------------

    def probabilities(
        self,
        p: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The (N, K) probabilities returned for honest (or earlier defended) ones `p`.
        labels: the victim's predicted classes (N,) (default: p's argmax)."""
        return p

    def explanation(
        self,
        e: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target: str | int | None = None,
    ) -> torch.Tensor:
        """The maps returned for maps `e`: (N, C, H, W), or (N, K, C, H, W) for every class.
        labels: the victim's predicted classes (N,); target: the explanation's target
        ("predicted", "all" or a class index; None: unknown)."""
        return e

    def computed_explanation(self, spec: Explanation) -> Explanation:
        """The explanation the service computes when `spec` is asked for (default: `spec`).
        Raises ValueError when the defence cannot apply to `spec`."""
        return spec

    # --- description --------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """The parameters' values, by name."""
        return {p.name: getattr(self, p.name) for p in self.parameters()}

    def spec(self) -> str:
        """The spec that builds this defence again (:func:`megex.defenses.build_defense`)."""
        values = self.values()
        if not values:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_text(v)}" for k, v in values.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "side": self.side, **self.values()}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # exact, and short when it can
    return str(value)
