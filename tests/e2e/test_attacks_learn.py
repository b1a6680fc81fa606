"""Every attack family's clone learns: a whole attack at a small budget beats chance widely.

Each test runs one attack end to end through the public API (a Victim behind a LocalOracle,
which counts every query; `megex.run` owns the budget) on the digits victim (8x8, 10 classes,
small_cnn, about 99% test accuracy), with the attack's defaults except a small generator
(ngf=8, the demo's), at 5,000 queries (8,000 for the two that learn later) and attack seed
0, and checks the clone's test accuracy. A change that breaks learning (a wrong sign in a
gradient, maps read wrongly, a clone that never trains) leaves the clone near chance (10%)
and fails here.

Thresholds: chance + half the gap between chance and the lowest accuracy measured over
attack seeds 0, 1 and 2 (same victim, same budget, one torch thread, 2-core CPU). The
measured accuracies are in MEASURED; each test takes 3-8 s on one idle thread.
"""

from dataclasses import dataclass, field
from typing import Any

import pytest

import megex
from megex import Explanation, LocalOracle, data
from megex.attacks import ATTACKS, adapt_to
from megex.defenses import build_defense
from megex.evaluate import Evaluator

pytestmark = pytest.mark.e2e

BUDGET = 5000
CHANCE = 0.1
ALL_CLASSES = Explanation("gradient", target="all")
PREDICTED = Explanation("gradient", target="predicted")


@dataclass(frozen=True)
class Family:
    """One attack family: the attack, its settings, what the service returns, and the
    clone accuracies measured at its budget with attack seeds 0, 1, 2."""

    method: str
    measured: tuple[float, float, float]
    settings: dict[str, Any] = field(default_factory=dict)
    explanation: Explanation | None = PREDICTED
    defenses: tuple[str, ...] = ()
    budget: int = BUDGET

    @property
    def threshold(self) -> float:
        return CHANCE + (min(self.measured) - CHANCE) / 2


# The replay options of MEGEX (clone queries ask for maps too, replayed answers keep their
# maps) are the benchmark's "megex-jacobian": the clone also matches its input gradients to
# every map it has paid for.
JACOBIAN = {"replay_maps": True, "explain_clone_queries": True}

MEASURED = {
    # maps of every class: the exact generator gradient
    "megex-all-classes": Family(
        "megex", (0.803, 0.575, 0.836), {"explanation": ALL_CLASSES}, ALL_CLASSES
    ),
    # the predicted class's map only (what real services return)
    "megex-predicted-class": Family(
        "megex", (0.786, 0.703, 0.764), {"explanation": PREDICTED}, PREDICTED
    ),
    # predictions only: forward differences
    "dfme": Family("dfme", (0.803, 0.731, 0.769), explanation=None),
    "megex-jacobian-all-classes": Family(
        "megex", (0.878, 0.778, 0.861), {"explanation": ALL_CLASSES, **JACOBIAN}, ALL_CLASSES
    ),
    "megex-jacobian-predicted-class": Family(
        "megex", (0.775, 0.767, 0.806), {"explanation": PREDICTED, **JACOBIAN}, PREDICTED
    ),
    # the adaptive attacker against the defences it adapts to (settings from adapt_to)
    "megex-adaptive-sign-maps": Family(
        "megex-adaptive",
        (0.869, 0.731, 0.797),
        {"explanation": ALL_CLASSES},
        ALL_CLASSES,
        ("sign",),
    ),
    "megex-adaptive-noisy-maps": Family(
        "megex-adaptive",
        (0.767, 0.761, 0.703),
        {"explanation": ALL_CLASSES},
        ALL_CLASSES,
        ("noise:0.5",),
    ),
    "megex-adaptive-withheld-maps": Family(
        "megex-adaptive",
        (0.794, 0.786, 0.733),
        {"explanation": ALL_CLASSES, "explain_clone_queries": True},
        ALL_CLASSES,
        ("withhold:0.5",),
    ),
    # evasion: confident latents selected by the clone, one padding query per attack image
    "megex-evasive-padded": Family(
        "megex-evasive",
        (0.750, 0.778, 0.769),
        {"explanation": ALL_CLASSES, "padding_per_query": 1},
        ALL_CLASSES,
    ),
    "dfme-evasive": Family("dfme-evasive", (0.694, 0.744, 0.661), explanation=None),
    # predictions only, the generator led by several clones' disagreement (no queries)
    # (they learn later: at 5,000 queries 0.31 and 0.23 at worst, so measured at 8,000)
    "disguide": Family("disguide", (0.619, 0.789, 0.800), explanation=None, budget=8000),
    "dual-students": Family("dual-students", (0.422, 0.753, 0.817), explanation=None, budget=8000),
    # the same, each clone also matching the predicted class's maps
    "disguide-maps-predicted-class": Family(
        "disguide-maps", (0.772, 0.708, 0.778), {"explanation": PREDICTED}, PREDICTED
    ),
    # predictions only, one clone: before each batch a fresh generator is made sure, by the
    # clone alone (no queries), of balanced classes; the clone learns the victim's top-1 class
    # (5 generator updates per batch, the authors' CIFAR-10 value: their 30 take 4x as long)
    "ideal": Family("ideal", (0.842, 0.869, 0.806), {"generator_steps": 5}, explanation=None),
}


# Attackers with images: 200 digits training images as the pool (100 for JBDA, which then
# makes one round of its own), 200 queries in requests of 20, the package's other defaults.
# Measured with attack seeds 0, 1, 2 as above: about 4 s per run without maps, 8 s with.
POOL_BUDGET = 200
POOL_MEASURED = {
    "knockoff": Family("knockoff", (0.931, 0.950, 0.936), explanation=None),
    "knockoff-maps-predicted-class": Family(
        "knockoff-maps", (0.969, 0.975, 0.953), {"explanation": PREDICTED}, PREDICTED
    ),
    "jbda": Family("jbda", (0.900, 0.925, 0.889), explanation=None),
    "jbda-maps-all-classes": Family(
        "jbda-maps", (0.969, 0.972, 0.958), {"explanation": ALL_CLASSES}, ALL_CLASSES
    ),
    # behind sign maps, read as directions at the clone's norms (settings from adapt_to);
    # about 25 s per run: each clone update also takes the clone's own map of every class
    "knockoff-maps-adaptive-sign-maps": Family(
        "knockoff-maps-adaptive",
        (0.978, 0.983, 0.981),
        {"explanation": ALL_CLASSES},
        ALL_CLASSES,
        ("sign",),
    ),
}


@pytest.fixture(scope="module")
def evaluator(digits_victim, digits_test) -> Evaluator:
    x, y = digits_test
    return Evaluator.from_victim(digits_victim, x, y)


def test_every_attack_has_a_family_here():
    covered = {family.method for family in [*MEASURED.values(), *POOL_MEASURED.values()]}
    assert covered == set(ATTACKS), "an attack without an end-to-end learning test"


@pytest.mark.parametrize("name", list(MEASURED))
def test_clone_beats_chance_by_a_wide_margin(name, digits_victim, evaluator):
    family = MEASURED[name]
    defenses = [build_defense(spec) for spec in family.defenses]
    settings = {**family.settings, **adapt_to(defenses)}
    attack = ATTACKS[family.method](seed=0, ngf=8, **settings)
    budget = family.budget
    oracle = LocalOracle(
        digits_victim, budget=budget, explanation=family.explanation, defenses=defenses
    )
    result = megex.run(attack, oracle, evaluator=evaluator, eval_every=budget, progress=False)

    # The oracle counted every query and the run stayed within one iteration of the budget.
    assert result.queries_used == oracle.queries_used <= budget
    assert result.queries_used > budget - attack.iteration_cost()
    if family.explanation is not None and "withhold:0.5" not in family.defenses:
        # The maps steered the generator, and they were the maps asked for.
        assert result.details["explanation"]["target"] == family.explanation.target
    assert result.clone_accuracy >= family.threshold, (
        f"{name}: clone accuracy {result.clone_accuracy:.3f} after {result.queries_used} "
        f"queries, expected >= {family.threshold:.3f} (measured {family.measured})"
    )


@pytest.mark.parametrize("name", list(POOL_MEASURED))
def test_clone_with_images_beats_chance_by_a_wide_margin(name, digits_victim, evaluator):
    family = POOL_MEASURED[name]
    pool = data.load("digits").train_tensors()[0][: 100 if "jbda" in name else 200]
    defenses = [build_defense(spec) for spec in family.defenses]
    settings = {**family.settings, **adapt_to(defenses)}
    attack = ATTACKS[family.method](pool, seed=0, query_batch=20, **settings)
    oracle = LocalOracle(
        digits_victim, budget=POOL_BUDGET, explanation=family.explanation, defenses=defenses
    )
    result = megex.run(attack, oracle, evaluator=evaluator, eval_every=POOL_BUDGET, progress=False)

    assert result.queries_used == oracle.queries_used == POOL_BUDGET
    if family.explanation is not None:
        assert result.details["explanation"]["target"] == family.explanation.target
    if family.method.startswith("jbda"):
        # The pool ran out after 100 queries: the rest were the attack's own images.
        assert result.details["augmentation_rounds"] == 1
    assert result.clone_accuracy >= family.threshold, (
        f"{name}: clone accuracy {result.clone_accuracy:.3f} after {result.queries_used} "
        f"queries, expected >= {family.threshold:.3f} (measured {family.measured})"
    )
