"""Declared settings: dataclass fields that carry their rule, help and group.

A setting is written once, as a dataclass field made by :func:`setting`: its default, a
one-line help, a check (:class:`Number`, :class:`Choice`, ...) and a group that lays out
help. Everything else reads the field: the validator (:func:`validate`), the parsers of text
(``megex attack --set NAME=VALUE``, defence and monitor specs, through :func:`read`), the
error messages (they name the setting and say what was expected) and the listings
(``megex settings``, ``megex defenses``). Attack configs, defences and query-stream monitors
declare their settings this way.

A check has two entry points: ``check(name, value)``, strict, for a config built in Python
(the value must already have the right type), and ``parse(value, where)``, lenient, for a
value that may be text: it returns the value typed (int, float, bool or str) and raises
:class:`SettingError` starting with `where`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import Field, dataclass, field
from typing import Any

__all__ = [
    "AT_LEAST_0",
    "COUNT",
    "COUNT_0",
    "FLAG",
    "POSITIVE",
    "Anything",
    "Choice",
    "Each",
    "Fractions",
    "Mapping",
    "Number",
    "OrNone",
    "Pair",
    "SettingError",
    "Text",
    "declared",
    "default_of",
    "describe_settings",
    "override",
    "read",
    "setting",
    "validate",
]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class SettingError(ValueError):
    """A setting is unknown or out of its range (names the setting and the rule)."""


def _fail(where: str, message: str) -> SettingError:
    return SettingError(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Number:
    """A number within [low, high] (open at either end when asked); whole numbers if `whole`."""

    low: float = -math.inf
    high: float = math.inf
    whole: bool = False
    low_open: bool = False
    high_open: bool = False

    @property
    def kind(self) -> type:
        """The Python type of a value: int for whole numbers, else float."""
        return int if self.whole else float

    def check(self, name: str, value: Any) -> None:
        kind = "a whole number" if self.whole else "a number"
        ok_type = isinstance(value, int) if self.whole else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            raise SettingError(f"{name}: expected {kind}{self.rule()}, got {value!r}")
        if not self._within(value):
            raise SettingError(f"{name}: expected {kind}{self.rule()}, got {value!r}")

    def rule(self) -> str:
        """The bounds as `megex settings` shows them (" >= 0 and <= 1"; "" when unbounded)."""
        parts = []
        if self.low > -math.inf:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high < math.inf:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return (" " + " and ".join(parts)) if parts else ""

    def expected(self) -> str:
        """What a value must be, in words: "a whole number in 2..16", "a number in (0, 1]",
        "a number >= 0"."""
        what = "a whole number" if self.whole else "a number"
        low, high = self.low > -math.inf, self.high < math.inf
        if low and high:
            if self.whole and not (self.low_open or self.high_open):
                return f"{what} in {self.low:g}..{self.high:g}"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if low:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if high:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return what

    def parse(self, value: Any, where: str = "") -> int | float:
        """`value` (a number, or text) as an int or float within the bounds."""
        expected = self.expected()
        if isinstance(value, bool):
            raise _fail(where, f"expected {expected}, got {value!r}")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise _fail(where, f"expected {expected}, got {value!r}") from None
        if not math.isfinite(number):
            if self.low == -math.inf and self.high == math.inf:
                expected = "a finite number"  # what "a number" means here
            raise _fail(where, f"expected {expected}, got {value!r}")
        if self.whole and not number.is_integer():
            raise _fail(where, f"expected {expected}, got {value!r}")
        if not self._within(number):
            raise _fail(where, f"expected {expected}, got {value!r}")
        return int(number) if self.whole else number

    def _within(self, value: float) -> bool:
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        return not (below or above)


@dataclass(frozen=True)
class Choice:
    """One of a few values (text, or True and False)."""

    options: tuple[Any, ...]

    @property
    def kind(self) -> type:
        return type(self.options[0])

    def check(self, name: str, value: Any) -> None:
        if value not in self.options or isinstance(value, bool) != isinstance(
            self.options[0], bool
        ):
            shown = ", ".join(repr(o) for o in self.options)
            raise SettingError(f"{name}: expected one of {shown}, got {value!r}")

    def rule(self) -> str:
        return " (" + " | ".join(str(o) for o in self.options) + ")"

    def expected(self) -> str:
        if self.kind is bool:
            return "true or false"
        return "one of " + ", ".join(str(o) for o in self.options)

    def parse(self, value: Any, where: str = "") -> Any:
        """`value`, or its text ("true", "off", ... for True and False), as an option."""
        if self.kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            value = True if lowered in _TRUE else False if lowered in _FALSE else value
        elif isinstance(value, str):
            value = {str(o): o for o in self.options}.get(value.strip(), value)
        if isinstance(value, bool) == (self.kind is bool) and value in self.options:
            return value
        raise _fail(where, f"expected {self.expected()}, got {value!r}")


@dataclass(frozen=True)
class OrNone:
    """None, or a value that `inner` accepts (None is given in Python, not as text)."""

    inner: Any

    @property
    def kind(self) -> type:
        return self.inner.kind

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.inner.check(name, value)

    def rule(self) -> str:
        return self.inner.rule()

    def expected(self) -> str:
        return self.inner.expected()

    def parse(self, value: Any, where: str = "") -> Any:
        return None if value is None else self.inner.parse(value, where)


@dataclass(frozen=True)
class Pair:
    """Two numbers (low, high) with bound < low <= high."""

    bound: float = 0.0

    def check(self, name: str, value: Any) -> None:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise SettingError(f"{name}: expected two numbers LOW,HIGH, got {value!r}") from None
        if not (self.bound < lo <= hi and math.isfinite(hi)):
            raise SettingError(f"{name}: expected {self.bound:g} < low <= high, got {value!r}")

    def rule(self) -> str:
        return f" (LOW,HIGH with {self.bound:g} < LOW <= HIGH)"


@dataclass(frozen=True)
class Fractions:
    """A tuple of fractions, each in (0, 1)."""

    def check(self, name: str, value: Any) -> None:
        try:
            ok = all(0 < float(m) < 1 for m in value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise SettingError(f"{name}: expected fractions in (0, 1), got {value!r}")

    def rule(self) -> str:
        return " (fractions in (0, 1))"


@dataclass(frozen=True)
class Anything:
    """No constraint; text stays text."""

    def check(self, name: str, value: Any) -> None:
        pass

    def rule(self) -> str:
        return ""

    def expected(self) -> str:
        return "any value"

    def parse(self, value: Any, where: str = "") -> Any:
        return value


POSITIVE = Number(0, high=math.inf, low_open=True)
AT_LEAST_0 = Number(0)
COUNT = Number(1, whole=True)
COUNT_0 = Number(0, whole=True)
FLAG = Choice((True, False))


def setting(default: Any, help: str, check: Any = None, group: str = "loop") -> Any:
    """A dataclass field that carries its constraint, group and help text."""
    meta = {"help": help, "check": check or Anything(), "group": group}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def override(cls: type, name: str, default: Any) -> Any:
    """A field for a subclass that changes only the default of `cls`'s setting `name`
    (its help and check are the ones declared there)."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field(default=default, metadata=base.metadata)


def declared(config: Any) -> list[Field]:
    """The settings of a dataclass (class or instance): its fields set by the constructor."""
    return [f for f in dataclasses.fields(config) if f.init]


def read(f: Field, value: Any, where: str = "") -> Any:
    """`value` for setting `f` (Python value or text), typed and checked by its check."""
    return f.metadata.get("check", Anything()).parse(value, where)


def default_of(f: Field) -> Any:
    """A field's default (made by its factory when it has one)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def validate(config: Any) -> None:
    """Check every field against its constraint; SettingError names the first one broken."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        check = f.metadata.get("check")
        if check is not None and not (value is None and f.default is None):
            check.check(f.name, value)
    check_combination = getattr(config, "check_combination", None)
    if check_combination is not None:
        check_combination()


def describe_settings(config_class: type) -> list[dict[str, Any]]:
    """Name, group, default, rule and help of every setting (for --set and its help)."""
    out = []
    for f in dataclasses.fields(config_class):
        out.append(
            {
                "name": f.name,
                "group": f.metadata.get("group", "loop"),
                "default": default_of(f),
                "rule": _shown_rule(f.metadata["check"].rule() if "check" in f.metadata else ""),
                "help": f.metadata.get("help", ""),
            }
        )
    return out


def _shown_rule(rule: str) -> str:
    """A rule as help shows it, in parentheses after the text."""
    rule = rule.strip()
    return "" if not rule else f" {rule}" if rule.startswith("(") else f" ({rule})"


@dataclass(frozen=True)
class Each:
    """A list whose every item passes `item` (a Number, Choice, ...)."""

    item: Any

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise SettingError(f"{name}: expected a list{self.rule()}, got {value!r}")
        for i, v in enumerate(value):
            self.item.check(f"{name}[{i}]", v)

    def rule(self) -> str:
        inner = self.item.rule().strip()
        return f" (a list, each {inner.strip('()')})" if inner else " (a list)"

    def expected(self) -> str:
        return f"a list{self.rule()}"

    def parse(self, value: Any, where: str = "") -> Any:
        self.check(where, value)
        return value


@dataclass(frozen=True)
class Mapping:
    """A JSON object (a dict with text keys)."""

    def check(self, name: str, value: Any) -> None:
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise SettingError(f"{name}: expected an object of named values, got {value!r}")

    def rule(self) -> str:
        return " (an object)"

    def expected(self) -> str:
        return "an object of named values"

    def parse(self, value: Any, where: str = "") -> Any:
        self.check(where, value)
        return value


@dataclass(frozen=True)
class Text:
    """Non-empty text (a name, a path)."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise SettingError(f"{name}: expected text, got {value!r}")

    def rule(self) -> str:
        return ""

    def expected(self) -> str:
        return "text"

    def parse(self, value: Any, where: str = "") -> Any:
        self.check(where, value)
        return value
