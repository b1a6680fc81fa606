"""ART's KnockoffNets as a peer: it steals a digits victim, the victim is shown exactly the
budget, and ART is given probabilities (not the victim's logits)."""

import sys

import pytest
import torch

from megex import data
from megex.experiments.art_peer import _CountingProbabilities, art_knockoff

BUDGET = 300


@pytest.fixture(scope="module")
def pool():
    return data.load("digits").train_tensors()[0][:BUDGET]


def _settings(**changes):
    settings = dict(clone_arch="small_cnn", seed=0, epochs=10, batch_size=32, lr=1e-3)
    settings.update(changes)
    return settings


def test_art_knockoff_clones_the_digits_victim_within_its_budget(digits_victim, digits_test, pool):
    pytest.importorskip("art")
    x_test, y_test = digits_test
    result = art_knockoff(digits_victim, pool, BUDGET, x_test=x_test, y_test=y_test, **_settings())
    # Ten classes: chance is 0.1; 300 answered images take the clone far beyond it.
    assert result["clone_accuracy"] > 0.5
    assert result["fidelity"] > 0.5
    assert result["queries"] == BUDGET
    assert result["victim_images_seen"] == BUDGET
    # What ART trained on were probabilities: every answer sums to 1.
    low, high = result["answer_row_sums"]
    assert low == pytest.approx(1.0, abs=1e-4) and high == pytest.approx(1.0, abs=1e-4)
    assert result["settings"]["loss"] == "cross-entropy (soft targets)"
    assert result["art_version"].startswith("1.")
    assert result["s_per_1k_queries"] > 0


def test_art_knockoff_with_labels_only_and_a_smaller_budget(digits_victim, digits_test, pool):
    pytest.importorskip("art")
    x_test, y_test = digits_test
    result = art_knockoff(
        digits_victim,
        pool,
        100,
        x_test=x_test,
        y_test=y_test,
        use_probability=False,
        **_settings(epochs=2, batch_size=50),
    )
    assert result["victim_images_seen"] == 100
    assert result["settings"]["loss"] == "cross-entropy (labels)"
    assert result["settings"]["fit_steps"] == 4


def test_art_knockoff_adaptive_sampling_queries_one_image_per_round(digits_victim, digits_test):
    pytest.importorskip("art")
    x_test, y_test = digits_test
    x_train, y_train = data.load("digits").train_tensors()
    result = art_knockoff(
        digits_victim,
        x_train[:BUDGET],
        40,
        x_test=x_test,
        y_test=y_test,
        sampling="adaptive",
        pool_labels=y_train[:BUDGET],
        **_settings(epochs=1),
    )
    assert result["victim_images_seen"] == 40
    assert result["settings"]["loss"] == "cross-entropy (labels)"
    assert result["settings"]["fit_steps"] == 40 + 2


def test_art_knockoff_without_art_says_how_to_install_it(
    digits_victim, digits_test, pool, monkeypatch
):
    # None in sys.modules makes `import art` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "art", None)
    x_test, y_test = digits_test
    with pytest.raises(ModuleNotFoundError, match="pip install 'megex\\[art\\]'"):
        art_knockoff(digits_victim, pool, 10, x_test=x_test, y_test=y_test, **_settings())


def test_the_victim_wrapper_turns_logits_into_counted_probabilities(digits_victim, pool):
    answers = _CountingProbabilities(digits_victim)
    with torch.no_grad():
        logits = digits_victim(pool[:7])
        out = answers(pool[:7])
        answers(pool[7:10])
    # The raw logits do not sum to 1; what ART sees does, in the same order of classes.
    assert not torch.allclose(logits.sum(1), torch.ones(7), atol=1e-2)
    torch.testing.assert_close(out.sum(1), torch.ones(7))
    assert torch.equal(out.argmax(1), logits.argmax(1))
    assert answers.images_seen == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": BUDGET + 1}, "may not exceed the pool"),
        ({"budget": 0}, "budget: expected a whole number >= 1"),
        ({"epochs": 0}, "epochs: expected a whole number >= 1"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": -1.0}, "lr: expected a finite number > 0"),
        ({"sampling": "greedy"}, "sampling: expected one of random, adaptive"),
        ({"sampling": "adaptive"}, "pool_labels: adaptive sampling"),
        ({"clone_arch": "vgg"}, "arch: unknown classifier"),
        ({"pool_images": torch.rand(10, 1, 28, 28)}, "pool_images: expected images of shape"),
        ({"pool_images": torch.full((10, 1, 8, 8), 2.0)}, "in \\[0, 1\\]"),
        ({"y_test": torch.zeros(3, dtype=torch.long)}, "y_test: 3 labels"),
        ({"victim": torch.nn.Linear(2, 2)}, "victim: expected a megex Victim"),
        ({"pool_labels": torch.zeros(BUDGET, dtype=torch.long)}, "random sampling does not"),
        (
            {"sampling": "adaptive", "pool_labels": torch.full((BUDGET,), 2, dtype=torch.long)},
            "classes 0..k-1 all present",
        ),
    ],
)
def test_art_knockoff_names_a_bad_argument(digits_victim, digits_test, pool, change, message):
    x_test, y_test = digits_test
    arguments = dict(
        victim=digits_victim, pool_images=pool, budget=BUDGET, x_test=x_test, y_test=y_test
    )
    arguments.update(_settings())
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        art_knockoff(**arguments)
