"""megex.stats' Student t quantiles and intervals against scipy.stats.

megex computes the quantiles itself (a closed-form CDF and bisection), so that core needs no
scipy. Tolerance: relative 1e-9 (absolute 1e-9 near 0). Measured over the grid below: at most
1.1e-12 relative, the worst at p = 0.9999 with 1 degree of freedom (t = 3183.1).
"""

import math
import statistics

import pytest

from megex import stats

scipy_stats = pytest.importorskip("scipy.stats")

LEVELS = [
    1e-4, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5,
    0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9999,
]  # fmt: skip
DEGREES = [*range(1, 31), 40, 50, 75, 100, 200, 500, 1000]


@pytest.mark.parametrize("df", DEGREES)
def test_t_quantiles_equal_scipy_over_a_grid(df):
    for p in LEVELS:
        expected = float(scipy_stats.t.ppf(p, df))
        assert math.isclose(stats.t_quantile(p, df), expected, rel_tol=1e-9, abs_tol=1e-9), (
            p,
            df,
        )


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_t_interval_equals_scipys(level, n):
    values = [0.3 + 0.1 * math.sin(3.7 * i) + 0.01 * i for i in range(n)]
    mean, low, high = stats.t_interval(values, level=level)
    sem = statistics.stdev(values) / math.sqrt(n)
    expected_low, expected_high = scipy_stats.t.interval(
        level, n - 1, loc=statistics.fmean(values), scale=sem
    )
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert low == pytest.approx(expected_low, rel=1e-9, abs=1e-12)
    assert high == pytest.approx(expected_high, rel=1e-9, abs=1e-12)
