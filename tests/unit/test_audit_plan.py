"""The audit's plan: what it runs, what that costs, and how it is cut to a time limit."""

import argparse

import pytest

from megex.cli.audit import duration
from megex.experiments.audit.plan import (
    RUN_OVERHEAD_S,
    AuditPlan,
    PlanTooLong,
    ThreatModel,
    estimate_seconds,
    fit_to_time_limit,
    runs_of,
)

DATA_FREE = ThreatModel(
    "data-free", "Data-free", "dfme", "megex-predicted", (1000, 2500, 5000, 10000),
    attacks={"dfme": "dfme", "megex-predicted": "megex"},
)  # fmt: skip
WITH_IMAGES = ThreatModel(
    "with-images", "With images", "knockoff", "knockoff-maps", (100, 300, 1000),
    pool="digits:seen:300", attacks={"knockoff": "knockoff", "knockoff-maps": "knockoff-maps"},
)  # fmt: skip
RATES = {
    "data-free": {"dfme": 0.001, "megex-predicted": 0.002},
    "with-images": {"knockoff": 0.02, "knockoff-maps": 0.04},
}


def plan(seeds=3, defenses=("label-only", "quantize:bits=2")) -> AuditPlan:
    return AuditPlan(
        (DATA_FREE, WITH_IMAGES), tuple(range(seeds)), defenses, frozenset({"label-only"})
    )


def test_runs_a_data_free_method_once_and_an_after_queries_method_once_per_budget():
    runs = runs_of(plan(seeds=1, defenses=()))
    assert [(m, q) for tm, m, s, q, d in runs if tm == "data-free"] == [
        ("dfme", 10000),
        ("megex-predicted", 10000),
    ]
    assert sorted(q for tm, m, s, q, d in runs if m == "knockoff") == [100, 300, 1000]


def test_a_prediction_defence_runs_both_attackers_a_map_defence_the_map_attacker_alone():
    defended = [(tm, m, q, d) for tm, m, s, q, d in runs_of(plan(seeds=1)) if d]
    assert ("data-free", "dfme", 10000, "label-only") in defended
    assert ("data-free", "megex-predicted", 10000, "quantize:bits=2") in defended
    assert ("data-free", "dfme", 10000, "quantize:bits=2") not in defended
    assert ("with-images", "knockoff-maps", 1000, "label-only") in defended
    assert len(defended) == 2 * (2 + 1)


def test_the_estimate_is_each_runs_queries_at_its_rate_plus_a_fixed_cost():
    one = AuditPlan((DATA_FREE,), (0,))
    expected = 2 * RUN_OVERHEAD_S + 10000 * (0.001 + 0.002)
    assert estimate_seconds(one, RATES) == pytest.approx(expected)
    assert estimate_seconds(one, RATES, jobs=2) == pytest.approx(expected / 2)


def test_no_limit_or_a_generous_one_cuts_nothing():
    full = plan(seeds=5)
    assert fit_to_time_limit(full, RATES, None) == (full, [])
    assert fit_to_time_limit(full, RATES, estimate_seconds(full, RATES) + 1) == (full, [])


def test_cuts_come_in_order_defences_seeds_budgets_then_seeds_to_two():
    full = plan(seeds=5)
    smallest = AuditPlan(
        (
            ThreatModel(**{**DATA_FREE.__dict__, "budgets": (1000, 2500)}),
            ThreatModel(**{**WITH_IMAGES.__dict__, "budgets": (100, 300)}),
        ),
        (0, 1),
        prediction_defenses=full.prediction_defenses,
    )
    fitted, cuts = fit_to_time_limit(full, RATES, estimate_seconds(smallest, RATES) + 0.01)
    assert fitted == smallest
    assert cuts[:2] == ["defence quantize:bits=2 not run (time limit)",
                        "defence label-only not run (time limit)"]  # fmt: skip
    assert cuts[2].startswith("4 attack seeds instead of 5")
    assert cuts[3].startswith("3 attack seeds instead of 4")
    budget_cuts = [c for c in cuts if "budget" in c]
    # The costlier threat model's largest budget goes first (with images: 0.06 s x 1000
    # queries against 0.003 s x 10000).
    assert budget_cuts[0].startswith("with-images: budget 1k not run")
    assert cuts[-1].startswith("2 attack seeds instead of 3")
    assert len(cuts) == 2 + 2 + 3 + 1


def test_a_limit_that_nothing_fits_names_what_the_smallest_plan_needs():
    with pytest.raises(PlanTooLong, match=r"--time-limit: the smallest audit .* needs about"):
        fit_to_time_limit(plan(), RATES, 1.0)


def test_each_fitted_plan_fits_the_limit_it_was_fitted_to():
    full = plan(seeds=4)
    total = estimate_seconds(full, RATES)
    for fraction in (0.9, 0.6, 0.3, 0.15):
        try:
            fitted, _ = fit_to_time_limit(full, RATES, total * fraction)
        except PlanTooLong:
            continue
        assert estimate_seconds(fitted, RATES) <= total * fraction


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("600", 600), ("2min", 120)]
)
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "ten minutes", "5d", "1e3"])
def test_bad_durations_say_what_was_expected(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive duration"):
        duration(text)
