"""The engine (budget, compute per query), the generator step's gradient, attack settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import megex
from megex import BudgetExceeded, Explanation, LocalOracle
from megex.attacks import DFME, MEGEX, MEGEXConfig, describe_settings, parse_setting
from megex.attacks.base import victim_targets
from megex.attacks.config import SettingError
from megex.engine import Metered

SMALL = {"batch_size": 16, "nz": 16, "ngf": 8}
LARGE = {**SMALL, "batch_size": 128}


@pytest.fixture(scope="module")
def victim():
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )
    return megex.Victim.from_module(module, (1, 8, 8), 10, mean=0.5, std=0.5).double().float()


def _generator_grads_from_step(attack, oracle):
    """The generator's gradient as the attack's own step computes it (no update applied)."""
    attack.generator_opt.step = lambda: None
    rng = attack.rng.get_state()
    attack.generator_step(oracle)
    grads = [p.grad.clone() for p in attack.generator.parameters()]
    attack.rng.set_state(rng)
    return grads


def _generator_grads_by_autograd(attack, victim, weight_confidence):
    """The same objective differentiated end to end through the victim itself."""
    c = attack.config
    z = attack.sample_latent(c.batch_size)
    _, x = attack.generate(z)
    clone_logits = attack.clone(x)
    logp_v = F.log_softmax(victim(x), dim=1)
    if c.loss == "kl":
        p = logp_v.exp()
        per_image = (p * (logp_v - F.log_softmax(clone_logits, dim=1))).sum(dim=1)
    else:
        per_image = (clone_logits - victim_targets(logp_v.exp())).abs().mean(dim=1)
    objective = -per_image.mean()
    if weight_confidence:
        targets = attack.latent_classes(z, logp_v.shape[1])
        objective = objective - weight_confidence * logp_v.gather(1, targets.view(-1, 1)).mean()
    attack.generator.zero_grad(set_to_none=True)
    objective.backward()
    return [p.grad.clone() for p in attack.generator.parameters()]


@pytest.mark.parametrize("loss", ["l1", "kl"])
@pytest.mark.parametrize("confidence", [0.0, 1.0])
def test_megex_generator_step_gradient_equals_autograd_through_the_victim(victim, loss, confidence):
    oracle = LocalOracle(victim, explanation=Explanation("gradient", target="all"))
    attack = MEGEX(
        seed=4, loss=loss, victim_confidence=confidence, train_on_generator_queries=False,
        **SMALL,
    )  # fmt: skip
    attack.setup(oracle, 10)
    # Batch norm in eval mode: both passes then see the same function of the latent.
    attack.generator.eval()
    attack.clone.eval()
    from_maps = _generator_grads_from_step(attack, oracle)
    exact = _generator_grads_by_autograd(attack, victim, confidence)
    for a, b in zip(from_maps, exact):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in exact)


def test_megex_refuses_kl_with_maps_of_one_class(victim):
    oracle = LocalOracle(victim, explanation=Explanation("gradient", target="predicted"))
    attack = MEGEX(loss="kl", **SMALL)
    attack.setup(oracle, 10)
    with pytest.raises(ValueError, match="kl"):
        attack.generator_step(oracle)


@pytest.mark.parametrize(
    "attack",
    [MEGEX(**LARGE), DFME(**LARGE), DFME(directions=10, **LARGE)],
    ids=["megex", "dfme-m1", "dfme-m10"],
)
def test_every_method_gets_the_same_clone_updates_per_query(victim, attack):
    # At batch 128 every method's fresh answers give fewer updates than the allotment.
    rate = attack.config.clone_updates_per_1k_queries
    oracle = LocalOracle(victim, budget=40_000, explanation=Explanation(target="all"))
    result = megex.run(attack, oracle, evaluator=lambda clone: {"clone_accuracy": 0.0},
                       eval_every=4000, progress=False)  # fmt: skip
    for row in result.metrics:
        # Replay makes up what fresh answers do not, after every step: never more than
        # one step's fresh updates above the allotment, never below it.
        assert int(rate * row["queries"] / 1000) <= row["clone_updates"]
        assert row["clone_updates"] <= int(rate * row["queries"] / 1000) + 2
    assert result.clone_updates == result.metrics[-1]["clone_updates"]
    assert result.generator_updates == result.iterations * attack.config.generator_steps
    assert result.queries_used == oracle.queries_used


def test_metered_oracle_counts_with_the_oracle_and_refuses_past_the_run_budget(victim):
    oracle = LocalOracle(victim, budget=1000)
    oracle.query(torch.rand(100, 1, 8, 8))
    metered = Metered(oracle, budget=50)
    assert metered.queries_used == 0 and metered.remaining == 50
    metered.query(torch.rand(30, 1, 8, 8))
    assert metered.queries_used == 30 and oracle.queries_used == 130
    with pytest.raises(BudgetExceeded):
        metered.query(torch.rand(21, 1, 8, 8))
    assert oracle.queries_used == 130  # refused whole, before the oracle


def test_settings_are_frozen_validated_and_described():
    config = MEGEXConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.nz = 3
    assert dataclasses.replace(config, nz=32).nz == 32 and config.nz == 256
    for bad, message in [
        ({"nz": 2.5}, "nz: expected a whole number >= 1, got 2.5"),
        ({"clone_lr": 0}, "clone_lr: expected a number > 0"),
        ({"lr_schedule": "cosine"}, "lr_schedule: expected one of"),
        ({"query_gamma": (2.0, 1.0)}, "query_gamma: expected 0 < low <= high"),
        ({"train_on_generator_queries": 1}, "train_on_generator_queries: expected one of"),
        ({"explanation": "gradient"}, "explanation: expected an Explanation"),
    ]:
        with pytest.raises(SettingError, match=message.replace("(", r"\(")):
            MEGEXConfig(**bad)
    described = describe_settings(MEGEXConfig)
    assert {d["name"] for d in described} == {f.name for f in dataclasses.fields(MEGEXConfig)}
    assert all(d["help"] for d in described)
    assert parse_setting(MEGEXConfig, "generator_restart_every", "100_000") == 100_000
    assert parse_setting(MEGEXConfig, "query_gamma", "0.5,4.5") == (0.5, 4.5)
    assert parse_setting(MEGEXConfig, "explain_clone_queries", "true") is True
    with pytest.raises(SettingError, match="unknown setting 'nope'"):
        parse_setting(MEGEXConfig, "nope", "1")
    with pytest.raises(SettingError, match="whole number"):
        parse_setting(MEGEXConfig, "replay_size", "1.5")
