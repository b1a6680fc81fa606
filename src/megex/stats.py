"""Statistics for comparisons over victims and attack seeds.

Runs are nested: several attack seeds on each of several victims (the same recipe trained
with different seeds). Intervals come from a hierarchical bootstrap that resamples victims,
then seeds within each victim, so that the spread between victims is not mistaken for
precision. A difference between two methods is taken on paired runs (same victim, same
seed) and called a difference only when two intervals exclude zero: the bootstrap's, and a
Student t interval over the victims' mean differences. With few victims the bootstrap's
top level resamples only a handful of values and its percentile interval is too narrow;
the t interval, with its n - 1 degrees of freedom, is not.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Nested",
    "bootstrap_interval",
    "mean_interval",
    "paired_difference",
    "t_interval",
    "t_quantile",
    "variance_components",
    "wilson_interval",
]

# values[victim][seed]: one number per run (None where a run has no value).
Nested = dict[Any, dict[Any, float]]


def _resample(data: Nested, rng: random.Random) -> list[float]:
    victims = list(data)
    out: list[float] = []
    for victim in rng.choices(victims, k=len(victims)):
        seeds = list(data[victim].values())
        out.extend(rng.choices(seeds, k=len(seeds)))
    return out


def bootstrap_interval(
    data: Nested,
    statistic: Callable[[Sequence[float]], float] = statistics.fmean,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` over all runs, with a hierarchical bootstrap
    percentile interval (victims resampled, then seeds within each)."""
    flat = [v for by_seed in data.values() for v in by_seed.values()]
    if not flat:
        raise ValueError("bootstrap_interval: no values")
    estimate = statistic(flat)
    if len(flat) == 1:
        return estimate, math.nan, math.nan
    rng = random.Random(seed)
    draws = sorted(statistic(_resample(data, rng)) for _ in range(resamples))
    tail = (1 - level) / 2
    low = draws[int(tail * (resamples - 1))]
    high = draws[int(math.ceil((1 - tail) * (resamples - 1)))]
    return estimate, low, high


def mean_interval(
    values: Sequence[float],
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high) of independent values (e.g. one per image), with a percentile
    bootstrap interval: the flat case of :func:`bootstrap_interval`, vectorised for the
    thousands of values that a per-image measure has. One value: (value, nan, nan)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("mean_interval: no values")
    estimate = float(data.mean())
    if data.size == 1:
        return estimate, math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Resamples in blocks of a few million draws, so that memory stays small for any n.
    block = max(1, 4_000_000 // data.size)
    means = np.concatenate(
        [
            data[rng.integers(0, data.size, size=(min(block, resamples - start), data.size))].mean(
                1
            )
            for start in range(0, resamples, block)
        ]
    )
    means.sort()
    tail = (1 - level) / 2
    low = float(means[int(tail * (resamples - 1))])
    high = float(means[int(math.ceil((1 - tail) * (resamples - 1)))])
    return estimate, low, high


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer `df`, from the closed-form finite series
    (Abramowitz and Stegun 26.7.3 and 26.7.4); exact, no special functions needed."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: theta + sin cos (1 + 2/3 c2 + ... + (2.4...(df-3))/(1.3...(df-2)) c2^..)
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        central = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        central = math.sin(theta) * total
    return 0.5 + math.copysign(central / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` (a positive integer) degrees of freedom."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if int(df) != df or df < 1:
        raise ValueError(f"t_quantile: df must be a positive integer, got {df}")
    df = int(df)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):  # bisection to float precision
        mid = (low + high) / 2
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval for the mean of independent values.
    Fewer than two values: (mean, nan, nan)."""
    values = list(values)
    if not values:
        raise ValueError("t_interval: no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(1 - (1 - level) / 2, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """(low, high): Wilson score interval for a proportion, e.g. a detection or a
    false-positive rate; unlike the normal approximation it stays in [0, 1] and is not empty
    at 0 of n or n of n."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(
            f"wilson_interval: expected 0 <= successes <= trials, trials >= 1; "
            f"got {successes} of {trials}"
        )
    z = statistics.NormalDist().inv_cdf(1 - (1 - level) / 2)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    half /= 1 + z * z / trials
    # The exact ends: 0 of n has low 0 and n of n has high 1 (rounding could miss them).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def _units(diffs: Nested) -> list[float]:
    """The independent units of a nested design for a t interval: one mean per victim, or
    the seeds' values where there is a single victim."""
    if len(diffs) == 1:
        return list(next(iter(diffs.values())).values())
    return [statistics.fmean(by_seed.values()) for by_seed in diffs.values()]


def paired_difference(a: Nested, b: Nested, level: float = 0.95, **kwargs: Any) -> dict[str, Any]:
    """Mean of a - b over the runs both have (same victim, same seed), with its intervals.

    `low`/`high` are the hierarchical bootstrap's; `t_low`/`t_high` a Student t interval
    over the victims' mean differences (over the seeds where there is one victim).
    `verdict` is 'a ahead' or 'b ahead' only where both intervals exclude 0 on the same
    side, else 'no difference measured'; with one pair there is no interval: 'one pair,
    no interval'. `level` sets both intervals' coverage. `spread` splits the differences'
    variance between victims and seeds (variance_components): a lead whose spread is mostly
    the victim's needs more victims, not more seeds.
    """
    diffs: Nested = {}
    for victim, by_seed in a.items():
        for seed, value in by_seed.items():
            other = b.get(victim, {}).get(seed)
            if other is not None and value is not None:
                diffs.setdefault(victim, {})[seed] = value - other
    pairs = sum(len(v) for v in diffs.values())
    if pairs == 0:
        return {"pairs": 0}
    mean, low, high = bootstrap_interval(diffs, level=level, **kwargs)
    units = _units(diffs)
    _, t_low, t_high = t_interval(units, level=level)
    if pairs > 1 and low > 0 and t_low > 0:
        verdict = "a ahead"
    elif pairs > 1 and high < 0 and t_high < 0:
        verdict = "b ahead"
    elif pairs == 1:
        verdict = "one pair, no interval"
    else:
        verdict = "no difference measured"
    return {
        "pairs": pairs,
        "units": len(units),
        "mean": mean,
        "low": low,
        "high": high,
        "t_low": t_low,
        "t_high": t_high,
        "verdict": verdict,
        "spread": variance_components(diffs),
    }


def variance_components(data: Nested) -> dict[str, float]:
    """How much of the spread comes from the victim and how much from the attack's seed.

    One-way random-effects estimate on a nested design: `seed` is the mean within-victim
    variance; `victim` the variance of victim means less what seed noise alone explains
    (floored at 0). `victim_share` is None where the design cannot split the two: fewer
    than two victims, or no victim with two seeds.
    """
    groups = [list(by_seed.values()) for by_seed in data.values() if by_seed]
    within = [statistics.variance(g) for g in groups if len(g) > 1]
    seed_var = statistics.fmean(within) if within else 0.0
    means = [statistics.fmean(g) for g in groups]
    n = statistics.fmean(len(g) for g in groups) if groups else 1
    between = statistics.variance(means) if len(means) > 1 else 0.0
    victim_var = max(0.0, between - seed_var / n)
    total = victim_var + seed_var
    if len(groups) < 2 or not within:
        share = None
    else:
        share = victim_var / total if total > 0 else 0.0
    return {"victim_var": victim_var, "seed_var": seed_var, "victim_share": share}
