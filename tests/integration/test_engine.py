"""The engine (budget, compute per query), the generator step's gradient, attack settings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import megex
from megex import BudgetExceeded, Explanation, LocalOracle
from megex.attacks import DFME, MEGEX, MEGEXConfig, describe_settings, parse_setting
from megex.attacks.base import victim_targets
from megex.attacks.config import AttackConfig, SettingError
from megex.engine import Attack, LoopSettings, Metered
from megex.engine.resume import SETTINGS_ADDED_SINCE

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
    oracle = LocalOracle(victim, budget=12_000, explanation=Explanation(target="all"))
    result = megex.run(attack, oracle, evaluator=lambda clone: {"clone_accuracy": 0.0},
                       eval_every=3000, progress=False)  # fmt: skip
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


def _members(protocol: type) -> set[str]:
    own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
    return {n for n in own if not n.startswith("_")}


def test_the_engine_needs_only_its_attack_protocol(victim):
    # The attacks depend on the engine's protocol, not the reverse.
    code = (
        "import sys, megex.engine; "
        "assert not [m for m in sys.modules if m.startswith('megex.attacks')]"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    assert {"step", "replay", "setup", "config", "clone_updates"} <= _members(Attack)
    for attack in (DFME(**SMALL), MEGEX(**SMALL)):
        attack.setup(LocalOracle(victim), 2)  # clone_arch is known after setup
        missing = [n for n in _members(Attack) if not hasattr(attack, n)]
        missing += [n for n in _members(LoopSettings) if not hasattr(attack.config, n)]
        assert not missing, f"{attack.name}: {missing}"


def test_runs_from_before_the_speed_settings_are_taken_to_have_their_defaults():
    # The values old runs had, written down; a new speed setting or a changed default must
    # decide here whether runs recorded before it still resume.
    speed = {
        f.name: f.default
        for f in dataclasses.fields(AttackConfig)
        if f.metadata["group"] == "speed"
    }
    assert {key: SETTINGS_ADDED_SINCE[key] for key in speed} == speed
    # Added later outside the speed group, with the value every earlier run had: an
    # adaptive attacker with images recorded before it read its answers as probabilities.
    from megex.attacks.adaptive import AnswersAsLabelsConfig

    assert set(SETTINGS_ADDED_SINCE) - set(speed) == {"answers_as"}
    assert SETTINGS_ADDED_SINCE["answers_as"] == AnswersAsLabelsConfig().answers_as


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


def test_stored_maps_are_the_victims_projected_input_gradients(victim):
    # What the buffer keeps for a replayed update is sum_k v_k d log pV_k / dx, by autograd.
    for target in ("all", "predicted"):
        oracle = LocalOracle(victim, explanation=Explanation("gradient", target=target))
        attack = MEGEX(replay_maps=True, explain_clone_queries=True, replay_size=64, **SMALL)
        attack.setup(oracle, 10)
        x = torch.rand(8, 1, 8, 8)
        answer = oracle.query(x, explanation=True)
        attack.observe(x, answer.probabilities, answer)
        stored = attack.replay_buffer.fields
        maps, weights = stored["maps"][:8].float(), stored["projections"][:8]
        xr = x.clone().requires_grad_(True)
        logp = F.log_softmax(victim(xr), dim=1)
        (exact,) = torch.autograd.grad((weights * logp).sum(), xr)
        torch.testing.assert_close(maps, exact, rtol=2e-3, atol=2e-4)  # float16 storage
        if target == "predicted":
            assert torch.equal(weights.argmax(1), answer.labels) and (weights.sum(1) == 1).all()
    # Input x gradient is undone to the gradient where the input is not 0; elsewhere the map
    # says nothing, it is stored as 0, and the matching term leaves those pixels out.
    oracle = LocalOracle(victim, explanation=Explanation("input_x_gradient", target="all"))
    attack = MEGEX(replay_maps=True, replay_size=64, **SMALL)
    attack.setup(oracle, 10)
    x = torch.rand(8, 1, 8, 8)
    x[:, :, :2] = 0.0  # a black border, as Fashion-MNIST's
    answer = oracle.query(x, explanation=True)
    attack.observe(x, answer.probabilities, answer)
    maps = attack.replay_buffer.fields["maps"][:8].float()
    weights = attack.replay_buffer.fields["projections"][:8]
    xr = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad((weights * F.log_softmax(victim(xr), 1)).sum(), xr)
    known = x > 1e-3
    torch.testing.assert_close(maps[known], exact[known], rtol=2e-2, atol=2e-3)
    assert (maps[:, :, :2] == 0).all()


def test_map_matching_term_vanishes_for_a_perfect_clone_and_has_autograd_gradients(victim):
    oracle = LocalOracle(victim, explanation=Explanation("gradient", target="all"))
    attack = MEGEX(replay_maps=True, clone="small_cnn", **SMALL)
    attack.setup(oracle, 10)
    x = torch.rand(8, 1, 8, 8)
    probs = torch.softmax(victim(x), 1).detach()
    weights = torch.randn(8, 10)
    xr = x.clone().requires_grad_(True)
    (target,) = torch.autograd.grad((weights * F.log_softmax(victim(xr), 1)).sum(), xr)
    # The victim as its own clone: the matching term is zero, only the disagreement is left.
    attack.clone = victim
    with_maps = attack.loss_with_maps(x, probs, target, weights)
    torch.testing.assert_close(with_maps, attack.clone_loss(x, probs), atol=1e-5, rtol=0)
    # A wrong target costs, and the clone's parameters get its gradient (double backprop),
    # equal to a finite difference along a random direction.
    attack.setup(oracle, 10)
    # In float64 and eval mode (no batch statistics), where a finite difference is exact
    # enough to compare with.
    attack.clone = attack.clone.double().eval()
    x, probs, target, weights = (t.double() for t in (x, probs, target, weights))
    params = [p for p in attack.clone.parameters()]
    loss = attack.loss_with_maps(x, probs, target, weights)
    grads = torch.autograd.grad(loss, params)
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    up = attack.loss_with_maps(x, probs, target, weights)
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    down = attack.loss_with_maps(x, probs, target, weights)
    numeric = (up - down) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    torch.testing.assert_close(analytic, numeric.detach(), rtol=1e-4, atol=1e-8)
    # Images stored without a map (weights all 0) add nothing to the term.
    none = torch.zeros_like(weights)
    torch.testing.assert_close(
        attack.loss_with_maps(x, probs, target, none), attack.clone_loss(x, probs)
    )
