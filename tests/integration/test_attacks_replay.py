"""Experience replay, the attack options, and exact resume with them."""

from __future__ import annotations

import pytest
import torch

import megex
from megex.attacks import DFME, MEGEX, MEGEXConfig
from megex.attacks.replay import ReplayBuffer
from megex.evaluate import Evaluator
from megex.models import build_classifier
from megex.victim import Victim


def test_replay_ring_keeps_the_newest_and_samples_what_it_holds():
    buf = ReplayBuffer(5, (1, 2, 2), 3)
    for i in range(4):
        x = torch.full((2, 1, 2, 2), i / 10)
        buf.add(x, torch.full((2, 3), float(i)))
    assert len(buf) == 5 and buf.added == 8
    # 8 pairs through a ring of 5: the three oldest (i = 0, 0, 1) are gone.
    assert sorted(buf.probs[:, 0].tolist()) == [1.0, 2.0, 2.0, 3.0, 3.0]
    x, p = buf.sample(64, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 2, 2)
    # Each image comes with the answer it was stored with.
    assert torch.allclose(x[:, 0, 0, 0] * 10, p[:, 0], atol=1e-2)
    state = buf.state_dict()
    other = ReplayBuffer(5, (1, 2, 2), 3)
    other.load_state_dict(state)
    assert len(other) == 5 and torch.equal(other.probs[:5], buf.probs[:5])
    assert other.position == buf.position


def test_replay_batch_larger_than_capacity():
    buf = ReplayBuffer(3, (1, 1, 1), 2)
    buf.add(torch.rand(7, 1, 1, 1), torch.arange(14.0).view(7, 2))
    assert len(buf) == 3 and buf.probs[:, 0].tolist() == [8.0, 10.0, 12.0]


def test_reservoir_keeps_a_uniform_sample_of_everything_added():
    buf = ReplayBuffer(1000, (1, 1, 1), 1, policy="reservoir")
    gen = torch.Generator().manual_seed(0)
    for i in range(50):
        ids = torch.arange(i * 200, (i + 1) * 200, dtype=torch.float32)
        buf.add(ids.view(-1, 1, 1, 1) / 16384, ids.view(-1, 1), gen)
    assert len(buf) == 1000 and buf.added == 10_000
    kept = buf.probs.view(-1)
    assert len(set(kept.tolist())) == 1000  # no pair stored twice
    # A ring would hold only ids 9000-9999; the reservoir spreads over all 10 phases.
    per_phase = torch.bincount((kept // 1000).long(), minlength=10)
    assert per_phase.min() >= 60 and per_phase.max() <= 140
    # Images and answers stay paired.
    assert torch.allclose(buf.images.view(-1).float() * 16384, kept, rtol=1e-3)
    # The same generator state repeats the same choices (a resumed run samples the same).
    again = ReplayBuffer(1000, (1, 1, 1), 1, policy="reservoir")
    gen = torch.Generator().manual_seed(0)
    for i in range(50):
        ids = torch.arange(i * 200, (i + 1) * 200, dtype=torch.float32)
        again.add(ids.view(-1, 1, 1, 1) / 16384, ids.view(-1, 1), gen)
    assert torch.equal(again.probs, buf.probs)
    with pytest.raises(ValueError, match="replay policy"):
        ReplayBuffer(10, (1, 1, 1), 1, policy="fifo")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: threads only add contention when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def victim() -> Victim:
    # Not seed 0: the attack's clone is built under its own seed and must differ.
    torch.manual_seed(123)
    model = build_classifier("small_cnn", 10, 1, 8)
    return Victim(model, (1, 8, 8), 10, arch="small_cnn", dataset="digits").eval()


@pytest.fixture(scope="module")
def evaluator(victim: Victim) -> Evaluator:
    x = torch.rand(64, 1, 8, 8)
    return Evaluator.from_victim(victim, x, victim.predict(x))


SMALL = {"batch_size": 16, "nz": 16, "ngf": 8, "clone_steps": 2}
OPTIONS = {
    "replay_size": 200,
    "clone_updates_per_1k_queries": 150.0,
    "train_on_generator_queries": True,
    "class_balance": 0.5,
    "clone_ema": 0.9,
    "lr_schedule": "constant",
}


@pytest.mark.parametrize(
    "attack, extra",
    [
        (MEGEX, {"explanation": megex.Explanation("gradient", target="all")}),
        (MEGEX, {"explanation_loss": 1.0, "explain_clone_queries": True}),
        # Interrupted at 96 queries, just after a restart fell due: the resumed run makes it.
        (MEGEX, {"generator_restart_every": 90}),
        (DFME, {"directions": 2, "generator_restart_every": 90}),
        (MEGEX, {"replay_policy": "ring", "query_gamma": (0.5, 4.5)}),
        (MEGEX, {"replay_maps": True, "explain_clone_queries": True}),
        (MEGEX, {"replay_maps": True, "explanation": megex.Explanation("gradient")}),
        (DFME, {"disagreement_until": 400}),
    ],
)
def test_options_run_within_budget_and_resume_exactly(tmp_path, victim, evaluator, attack, extra):
    settings = {**SMALL, **OPTIONS, **extra}
    budget = 1000
    full = megex.run(
        attack(seed=3, **settings),
        megex.LocalOracle(victim, budget=budget),
        evaluator=evaluator,
        progress=False,
    )
    assert 0 < full.queries_used <= budget
    # Interrupted after two iterations, then resumed from the run folder.
    oracle = megex.LocalOracle(victim, budget=budget)

    def stop(iteration, spent):
        if iteration == 2:
            raise KeyboardInterrupt

    first = megex.run(
        attack(seed=3, **settings),
        oracle,
        evaluator=evaluator,
        eval_every=1,
        run_dir=tmp_path,
        progress=False,
        callback=stop,
        service_state=oracle.state_dict,
    )
    assert not first.finished
    resumed_oracle = megex.LocalOracle(victim, budget=budget)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    resumed_oracle.load_state_dict(state["service"])
    resumed = megex.run(
        attack(seed=3, **settings),
        resumed_oracle,
        budget,
        evaluator=evaluator,
        run_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert resumed.queries_used == full.queries_used
    assert resumed_oracle.queries_used == full.queries_used
    assert resumed.clone_accuracy == full.clone_accuracy
    for a, b in zip(resumed.clone.parameters(), full.clone.parameters()):
        assert torch.equal(a, b)


def test_eval_at_reports_smaller_budgets_exactly(victim, evaluator):
    settings = {**SMALL, "lr_schedule": "constant", "replay_size": 100}
    cost = MEGEX(**settings).iteration_cost()
    long = megex.run(
        MEGEX(seed=1, **settings),
        megex.LocalOracle(victim, budget=10 * cost),
        evaluator=evaluator,
        eval_at=[4 * cost + 5],
        progress=False,
    )
    short = megex.run(
        MEGEX(seed=1, **settings),
        megex.LocalOracle(victim, budget=4 * cost + 5),
        evaluator=evaluator,
        progress=False,
    )
    row = next(r for r in long.metrics if r["queries"] == 4 * cost)
    assert row["clone_accuracy"] == short.clone_accuracy


def test_explanation_loss_matches_gradients_on_a_known_target(victim):
    attack = MEGEX(**SMALL, explanation_loss=1.0)
    oracle = megex.LocalOracle(victim, budget=None, explanation=megex.Explanation("gradient"))
    attack.setup(oracle, 10)
    x = torch.rand(8, 1, 8, 8)
    answer = oracle.query(x, explanation=True)
    with_maps = attack.clone_loss(x, answer.probabilities, answer)
    without = attack.clone_loss(x, answer.probabilities, None)
    # The extra term is a relative squared error: positive, and of order one for a random clone.
    assert with_maps.item() > without.item()
    assert with_maps.item() - without.item() < 10


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="replay_size"):
        MEGEX(replay_size=0, clone_updates_per_1k_queries=10.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        DFME(lr_schedule="cosine")
    with pytest.raises(ValueError, match="explanation_loss"):
        MEGEX(config=MEGEXConfig(explanation_loss=-1.0))
    with pytest.raises(ValueError, match="clone_ema"):
        DFME(clone_ema=1.0)
    with pytest.raises(ValueError, match="disagreement_weight"):
        DFME(disagreement_weight=-1.0)
    with pytest.raises(ValueError, match="replay_policy"):
        MEGEX(replay_policy="fifo")
    for bad in (-1, "100k", 1.5, True):
        with pytest.raises(ValueError, match="generator_restart_every: expected a whole number"):
            MEGEX(generator_restart_every=bad)


def test_generator_is_redrawn_once_per_period(victim):
    oracle = megex.LocalOracle(victim, budget=None, explanation=megex.Explanation())

    def fresh_attack():
        attack = MEGEX(**SMALL, generator_restart_every=1000)
        attack.setup(oracle, 10)
        return attack

    attack = fresh_attack()
    initial = {k: v.clone() for k, v in attack.generator.state_dict().items()}
    for _ in range(2):
        attack.generator_step(oracle)
    assert attack.generator_opt.state  # Adam has moments now
    trained = {k: v.clone() for k, v in attack.generator.state_dict().items()}
    attack.restart_generator_if_due(999)
    assert all(torch.equal(trained[k], v) for k, v in attack.generator.state_dict().items())
    attack.restart_generator_if_due(1000)
    redrawn = {k: v.clone() for k, v in attack.generator.state_dict().items()}
    weights = [k for k in redrawn if k.endswith("weight") and redrawn[k].dim() > 1]  # not BN
    assert not any(torch.equal(redrawn[k], trained[k]) for k in weights)
    assert not any(torch.equal(redrawn[k], initial[k]) for k in weights)
    assert not attack.generator_opt.state  # a fresh optimiser
    assert attack.generator_restarts == 1
    # Due once per period; the same run (or a resumed one) re-draws the same weights.
    attack.restart_generator_if_due(1999)
    assert all(torch.equal(redrawn[k], v) for k, v in attack.generator.state_dict().items())
    other = fresh_attack()
    other.restart_generator_if_due(1500)
    assert all(torch.equal(redrawn[k], v) for k, v in other.generator.state_dict().items())
    # Re-drawing leaves the attack's own random streams where they were.
    torch_state, rng_state = torch.get_rng_state(), attack.rng.get_state()
    attack.restart_generator_if_due(2000)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(attack.rng.get_state(), rng_state)


def test_brightness_prior_is_a_function_of_the_latent(victim):
    attack = DFME(**SMALL, query_gamma=(0.5, 4.5))
    attack.setup(megex.LocalOracle(victim, budget=None), 10)
    z = torch.randn(4, SMALL["nz"])
    pre = torch.randn(4, 1, 8, 8)
    x = attack.to_query(pre, z)
    assert x.min() >= 0 and x.max() <= 1
    # A group of copies per latent (DFME's perturbed points) shares that latent's gamma.
    group = attack.to_query(pre.repeat_interleave(3, dim=0), z)
    assert torch.allclose(group[::3], x)
    plain = DFME(**SMALL, query_gamma=(1.0, 1.0))
    plain.setup(megex.LocalOracle(victim, budget=None), 10)
    assert torch.allclose(plain.to_query(pre, z), (torch.tanh(pre) + 1) / 2)
    classes = attack.latent_classes(torch.randn(5000, 16), 10)
    assert torch.bincount(classes, minlength=10).min() > 350  # about uniform


@pytest.mark.parametrize("attack", [MEGEX, DFME])
def test_generator_objective_weights_can_switch_every_term_off(victim, attack):
    # With both the disagreement and the victim-guided term weighted 0 the generator's
    # gradient is exactly zero, so its step changes nothing; with the defaults it moves.
    moved = []
    for settings in ({"disagreement_weight": 0.0, "victim_confidence": 0.0}, {}):
        a = attack(**SMALL, seed=2, train_on_generator_queries=False, **settings)
        oracle = megex.LocalOracle(
            victim, budget=None, explanation=megex.Explanation("gradient", target="all")
        )
        a.setup(oracle, 10)
        before = [p.detach().clone() for p in a.generator.parameters()]
        a.generator_step(oracle)
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, a.generator.parameters())))
    assert moved == [False, True]


def test_disagreement_is_dropped_after_the_given_query_count(victim):
    attack = MEGEX(**SMALL, disagreement_until=100)
    attack.queries_at_step = 99
    assert attack.disagreement_now() == 1.0
    attack.queries_at_step = 100
    assert attack.disagreement_now() == 0.0
    assert MEGEX(**SMALL).disagreement_now() == 1.0
    with pytest.raises(ValueError, match="disagreement_until"):
        MEGEX(disagreement_until=-5)
