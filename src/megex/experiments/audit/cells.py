"""How every figure of the audit's report is written: one function per kind of cell, shared by
report.md and report.html so that the two formats cannot disagree.

Accuracies are fractions in the summary and percentages (one decimal) in the report;
differences are percentage points with a sign; a missing value (None or NaN) is "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..common import fmt_budget

__all__ = [
    "NA",
    "duration",
    "factor",
    "is_missing",
    "leakage",
    "listing",
    "pct",
    "per_query",
    "pct_interval",
    "points",
    "points_interval",
    "queries",
    "ratio",
    "reached",
    "target",
]

NA = "n/a"


def is_missing(value: Any) -> bool:
    """True for None and NaN (what the summary uses for a value it does not have)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: float | None, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    if is_missing(value):
        return NA
    text = f"{scale * value:{'+' if sign else ''}.{digits}f}"
    # A value that rounds to zero is written +0.0, never -0.0.
    return text.replace("-", "+" if sign else "") if float(text) == 0 else text


def _interval(
    i: Mapping[str, float] | None, scale: float, digits: int, sign: bool, unit: str = ""
) -> str:
    """'estimate[unit] [low, high]': the ends unsigned, each missing end "n/a"."""
    if i is None or is_missing(i.get("estimate")):
        return NA
    low = _number(i.get("low"), scale, digits)
    high = _number(i.get("high"), scale, digits)
    return f"{_number(i['estimate'], scale, digits, sign)}{unit} [{low}, {high}]"


def pct(value: float | None) -> str:
    """A fraction as a percentage: 0.9712 -> '97.1'."""
    return _number(value, 100)


def points(value: float | None) -> str:
    """A difference of fractions in percentage points, signed: 0.048 -> '+4.8'."""
    return _number(value, 100, sign=True)


def pct_interval(i: Mapping[str, float] | None) -> str:
    """An accuracy interval in %: '85.3 [84.0, 86.5]'."""
    return _interval(i, 100, 1, sign=False)


def points_interval(i: Mapping[str, float] | None) -> str:
    """A difference interval in points: '+4.8 [4.0, 5.7]'."""
    return _interval(i, 100, 1, sign=True)


def factor(i: Mapping[str, float] | None) -> str:
    """A ratio interval: '2.1x [1.4, 3.0]'."""
    return _interval(i, 1, 1, sign=False, unit="x")


def ratio(value: float | None, digits: int = 2) -> str:
    """A plain number such as a cosine: '0.57'."""
    return _number(value, 1, digits)


def queries(value: int | None) -> str:
    """A number of queries in words: 10000 -> '10k'."""
    return NA if is_missing(value) else fmt_budget(int(value))


def reached(count: int | None, runs: int | None) -> str:
    """'2/3 runs'."""
    if is_missing(count) or is_missing(runs):
        return NA
    return f"{count}/{runs} runs"


def target(fraction: float, victim_accuracy: float | None) -> str:
    """'80% of the victim (77.6%)': a target fraction of the victim's accuracy."""
    text = f"{_number(fraction, 100, 0)}% of the victim"
    if is_missing(victim_accuracy) or is_missing(fraction):
        return text
    return f"{text} ({pct(fraction * victim_accuracy)}%)"


def leakage(row: Mapping[str, Any], top_budget: int | None) -> str:
    """What predictions alone need, in queries, for the clone that maps give at this target."""
    bound, f = row.get("bound"), row.get("factor")
    if f is None or is_missing(f.get("estimate")):
        if not row.get("baseline_reached") and not row.get("attacker_reached"):
            return f"not reached by either within {queries(top_budget)} queries"
        return "no ratio (too few runs reached it)"
    if bound == "at_least":
        return f"predictions alone need at least {_number(f['estimate'])}x"
    if bound == "at_most":
        return f"predictions alone need at most {_number(f['estimate'])}x"
    return f"predictions alone need {factor(f)}"


def duration(seconds: float | None) -> str:
    """A wall time in words: '45 s', '4.0 min', '1.2 h'."""
    if is_missing(seconds):
        return NA
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def per_query(seconds: float | None) -> str:
    """A time per query: 0.0008 -> '0.80 ms'."""
    return NA if is_missing(seconds) else f"{1000 * seconds:.2f} ms"


def listing(values: Sequence[Any] | None) -> str:
    """'0, 1, 2' ('n/a' for none)."""
    return ", ".join(str(v) for v in values) if values else NA
