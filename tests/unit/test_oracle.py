import numpy as np
import pytest
import torch
from torch import nn

import megex
from megex import BudgetExceeded, Explanation, ExplanationNotOffered, InvalidQuery, LocalOracle
from megex.defenses import build_defense


class HandWritten(nn.Module):
    """A user's own model: not one of megex's architectures."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def user_victim():
    torch.manual_seed(0)
    return megex.Victim.from_module(HandWritten(), (1, 8, 8), 10, mean=0.3, std=0.4)


def test_from_module_wraps_normalisation_and_checks_output(user_victim):
    x = torch.rand(3, 1, 8, 8)
    expected = user_victim.model((x - 0.3) / 0.4)
    torch.testing.assert_close(user_victim(x), expected)
    with pytest.raises(ValueError, match=r"expected \(1, 5\) logits"):
        megex.Victim.from_module(HandWritten(), (1, 8, 8), 5)
    with pytest.raises(ValueError, match="std"):
        megex.Victim.from_module(HandWritten(), (1, 8, 8), 10, std=0.0)


def test_query_answers_and_counts_one_per_image(user_victim):
    oracle = LocalOracle(user_victim, budget=100, explanation=Explanation(target="all"))
    x = torch.rand(7, 1, 8, 8)
    answer = oracle.query(x)
    assert answer.probabilities.shape == (7, 10) and answer.explanation is None
    torch.testing.assert_close(answer.probabilities.sum(1), torch.ones(7))
    assert oracle.queries_used == 7 and oracle.remaining == 93
    answer = oracle.query(x, explanation=True)  # an explanation costs nothing extra
    assert answer.explanation.shape == (7, 10, 1, 8, 8)
    assert answer.explanation_spec == Explanation(target="all")
    assert oracle.queries_used == 14
    reference = megex.explain(user_victim, x, Explanation(target="all"))
    torch.testing.assert_close(answer.explanation, reference)
    single = oracle.query(x[:2], explanation=Explanation("smoothgrad", target="predicted"))
    assert single.explanation.shape == (2, 1, 8, 8) and oracle.queries_used == 16


def test_budget_refuses_whole_batch_and_charges_nothing(user_victim):
    oracle = LocalOracle(user_victim, budget=10)
    oracle.query(torch.rand(8, 1, 8, 8))
    with pytest.raises(BudgetExceeded, match="needs 3 queries but only 2 of 10 remain") as info:
        oracle.query(torch.rand(3, 1, 8, 8))
    assert info.value.remaining == 2 and oracle.queries_used == 8
    oracle.query(torch.rand(2, 1, 8, 8))
    assert oracle.remaining == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 1, 8), "shape"),
        (torch.rand(2, 3, 8, 8), r"does not match \(N, 1, 8, 8\)"),
        (torch.randint(0, 255, (2, 1, 8, 8)), "not floating point"),
        (np.zeros((2, 1, 8, 8), dtype=np.uint8), "divide uint8 images by 255"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), float("inf")), "NaN or infinite"),
        (torch.full((2, 1, 8, 8), 1.5), r"\[0, 1\]"),
        (-torch.rand(2, 1, 8, 8) - 0.1, r"\[0, 1\]"),
        (torch.rand(0, 1, 8, 8), "empty"),
        ([[0.5]], "torch tensor or numpy array"),
    ],
)
def test_bad_inputs_are_refused_clearly_and_cost_nothing(user_victim, bad, message):
    oracle = LocalOracle(user_victim, budget=10)
    with pytest.raises(InvalidQuery, match=message):
        oracle.query(bad)
    assert oracle.queries_used == 0


def test_numpy_float_input_is_accepted(user_victim):
    oracle = LocalOracle(user_victim)
    answer = oracle.query(np.random.rand(2, 1, 8, 8))  # float64 numpy
    assert answer.probabilities.dtype == torch.float32 and oracle.queries_used == 2
    assert oracle.remaining == float("inf")


def test_prediction_modes(user_victim):
    x = torch.rand(5, 1, 8, 8)
    full = LocalOracle(user_victim).query(x)
    logits = LocalOracle(user_victim, prediction="logits").query(x)
    torch.testing.assert_close(torch.softmax(logits.logits, 1), full.probabilities)
    top = LocalOracle(user_victim, prediction="top-k", top_k=2).query(x)
    assert ((top.probabilities > 0).sum(1) == 2).all()
    torch.testing.assert_close(top.probabilities.max(1).values, full.probabilities.max(1).values)
    label = LocalOracle(user_victim, prediction="label").query(x)
    assert torch.equal(label.probabilities.argmax(1), full.labels)
    assert torch.equal(label.probabilities.sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="top_k"):
        LocalOracle(user_victim, prediction="top-k")
    with pytest.raises(ValueError, match="unknown mode"):
        LocalOracle(user_victim, prediction="scores")


def test_explanation_policy(user_victim):
    x = torch.rand(2, 1, 8, 8)
    silent = LocalOracle(user_victim, explanation=None)
    with pytest.raises(ExplanationNotOffered, match="returns no explanations"):
        silent.query(x, explanation=True)
    fixed = LocalOracle(user_victim, explanation=Explanation(), allow_explanation_choice=False)
    with pytest.raises(ExplanationNotOffered, match="returns only gradient"):
        fixed.query(x, explanation=Explanation(target="all"))
    assert fixed.queries_used == 0
    assert fixed.query(x, explanation=Explanation()).explanation.shape == (2, 1, 8, 8)
    with pytest.raises(ExplanationNotOffered, match="class 12 does not exist"):
        LocalOracle(user_victim).query(x, explanation=Explanation(target=12))


def test_defenses_change_what_is_returned(user_victim):
    x = torch.rand(4, 1, 8, 8)
    plain = LocalOracle(user_victim).query(x, explanation=True)
    rounded = LocalOracle(user_victim, defenses=[build_defense("round:1")]).query(x)
    assert torch.equal(rounded.probabilities, torch.round(plain.probabilities, decimals=1))
    signed = LocalOracle(user_victim, defenses=[build_defense("sign")]).query(x, True)
    assert torch.equal(signed.explanation, torch.sign(plain.explanation))
    sparse = LocalOracle(user_victim, defenses=[build_defense("topk:0.25")]).query(x, True)
    assert ((sparse.explanation != 0).flatten(1).sum(1) <= 16).all()
    with pytest.raises(ValueError, match="unknown 'blur'"):
        build_defense("blur")
    with pytest.raises(ValueError, match="expected a number"):
        build_defense("noise:lots")


def test_local_oracle_is_an_oracle(user_victim):
    assert isinstance(LocalOracle(user_victim), megex.Oracle)


def test_probability_defenses_cannot_be_bypassed_by_logits(user_victim):
    with pytest.raises(ValueError, match="does not apply to prediction='logits'"):
        LocalOracle(user_victim, prediction="logits", defenses=[build_defense("round:2")])
    # Explanation defences are fine with any prediction mode.
    LocalOracle(user_victim, prediction="logits", defenses=[build_defense("sign")])
