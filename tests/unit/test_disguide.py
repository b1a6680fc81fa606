"""DisGUIDE, dual students and disguide-maps: the generator's objective, the queries a step
spends, the compute per query against DFME's, exact resume and the saved clone."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from victim_support import untrained_8x8_victim

import megex
from megex import Explanation, LocalOracle
from megex.attacks import ATTACKS, DFME, DisGUIDE, DisGUIDEMaps, DualStudents, SettingError
from megex.attacks.disguide import clone_discrepancy
from megex.evaluate import Evaluator, predict
from megex.models import SoftVote, build_classifier
from megex.runs import RunFolder

TINY = {"batch_size": 16, "nz": 16, "ngf": 8}
ALL_CLASSES = Explanation("gradient", target="all")


@pytest.fixture(scope="module")
def victim() -> megex.Victim:
    return untrained_8x8_victim()


@pytest.fixture(scope="module")
def evaluator(victim) -> Evaluator:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, 1, 8, 8, generator=g)
    return Evaluator.from_victim(victim, x, predict(victim, x))


def _written_out_objective(attack: DisGUIDE, x: torch.Tensor) -> torch.Tensor:
    """The generator's loss as the papers write it, from the clones' outputs on `x`."""
    c = attack.config
    logits = [clone.model(x) for clone in attack.clones]
    if c.discrepancy == "logit_l1":
        pairs = [(i, j) for i in range(len(logits)) for j in range(i + 1, len(logits))]
        spread = sum((logits[i] - logits[j]).abs().mean() for i, j in pairs) / len(pairs)
    else:
        probs = [F.softmax(v, dim=1) for v in logits]
        mean = sum(probs) / len(probs)
        var = sum((p - mean) ** 2 for p in probs) / (len(probs) - 1)
        spread = var.sqrt().mean()
    objective = -spread
    if c.class_balance > 0:
        m = (sum(F.softmax(v, dim=1) for v in logits) / len(logits)).mean(dim=0)
        objective = objective + c.class_balance * (m * m.log()).sum()
    return objective


@pytest.mark.parametrize(
    "attack_class, settings",
    [
        (DisGUIDE, {"class_balance": 0.5}),
        (DisGUIDE, {"clones": 3, "class_balance": 0.0}),
        (DualStudents, {}),
    ],
    ids=["disguide", "disguide-3-clones", "dual-students"],
)
def test_generator_gradient_is_autograd_of_the_written_out_loss(victim, attack_class, settings):
    oracle = LocalOracle(victim)
    attack = attack_class(seed=2, **TINY, **settings)
    attack.setup(oracle, 10)
    attack.generator.eval()  # both passes then see the same function of the latent
    attack.generator_opt.step = lambda: None  # keep the weights: compare one gradient
    rng = attack.rng.get_state()
    info = attack.generator_step(oracle)
    from_step = [p.grad.clone() for p in attack.generator.parameters()]
    assert oracle.queries_used == 0, "the generator step must not query the victim"
    # The clones learn nothing from the generator's pass.
    assert all(p.grad is None for clone in attack.clones for p in clone.model.parameters())

    attack.rng.set_state(rng)
    _, x = attack.generate(attack.sample_latent(attack.config.batch_size))
    attack.generator.zero_grad(set_to_none=True)
    objective = _written_out_objective(attack, x)
    objective.backward()
    by_hand = [p.grad for p in attack.generator.parameters()]
    for a, b in zip(from_step, by_hand):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in by_hand)
    assert info["generator_loss"] > 0


@pytest.mark.parametrize("form", ["softmax_std", "logit_l1"])
def test_disagreement_is_zero_with_a_zero_gradient_when_clones_are_equal(form):
    one = torch.randn(8, 1, 10) * 30  # saturated softmax too
    logits = one.repeat(1, 3, 1).requires_grad_(True)
    value = clone_discrepancy(logits, form)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().max()) == 0.0
    different = torch.cat([one, one + torch.randn_like(one)], dim=1)
    assert float(clone_discrepancy(different, form)) > 0


def test_generator_loss_is_zero_for_identical_clones(victim):
    oracle = LocalOracle(victim)
    attack = DisGUIDE(seed=0, class_balance=0.0, **TINY)
    attack.setup(oracle, 10)
    attack.clones[1].model.load_state_dict(attack.clones[0].model.state_dict())
    info = attack.generator_step(oracle)
    assert info["generator_loss"] == 0.0
    assert all(torch.isfinite(p).all() for p in attack.generator.parameters())


@pytest.mark.parametrize("name", ["disguide", "dual-students", "disguide-maps"])
def test_a_step_spends_batch_times_clone_steps_queries_and_trains_every_clone(victim, name):
    oracle = LocalOracle(victim, explanation=ALL_CLASSES)
    attack = ATTACKS[name](seed=0, clone_steps=2, generator_steps=3, clones=3, **TINY)
    attack.setup(oracle, 10)
    assert attack.queries_per_generator_step() == 0
    assert attack.iteration_cost() == 16 * 2
    before = [[p.detach().clone() for p in c.model.parameters()] for c in attack.clones]
    for step in range(1, 3):
        attack.step(oracle)
        assert oracle.queries_used == step * 16 * 2
        assert attack.generator_updates == step * 3
        # Every fresh batch trains every clone: one clone update each.
        assert attack.clone_updates == step * 2 * 3
    for old, clone in zip(before, attack.clones):
        assert any(not torch.equal(a, b) for a, b in zip(old, clone.model.parameters()))


def test_maps_variant_asks_for_maps_on_every_query_and_replays_them(victim):
    asked: list[Any] = []
    oracle = LocalOracle(victim, explanation=ALL_CLASSES)
    query = oracle.query
    oracle.query = lambda x, explanation=None: asked.append(explanation) or query(x, explanation)
    attack = DisGUIDEMaps(seed=0, replay_size=64, **TINY)
    attack.setup(oracle, 10)
    attack.step(oracle)
    attack.replay(2)
    assert asked and all(e is True for e in asked)
    assert attack.replay_buffer.stores_maps and len(attack.replay_buffer) == 16
    assert attack.details()["explanation"]["target"] == "all"


def _count_clone_steps(attack: Any, counts: Counter) -> None:
    """Count every optimiser step of the attack's clones (whatever the attack calls them)."""
    opts = [c.opt for c in attack.clones] if hasattr(attack, "clones") else [attack.clone_opt]
    for opt in opts:
        opt.register_step_post_hook(lambda *_: counts.update(["steps"]))


@pytest.mark.parametrize("clones", [2, 3])
def test_clone_steps_per_query_are_dfmes_at_the_same_allotment(victim, clones):
    rate, budget = 25.0, 3_072
    large = {**TINY, "batch_size": 128}
    rows = {}
    for name, attack in (("dfme", DFME(**large)), ("disguide", DisGUIDE(**large, clones=clones))):
        counts: Counter = Counter()
        original_setup = attack.setup

        def setup(oracle, iterations, _attack=attack, _setup=original_setup, _counts=counts):
            _setup(oracle, iterations)
            _count_clone_steps(_attack, _counts)

        attack.setup = setup
        oracle = LocalOracle(victim, budget=budget)
        result = megex.run(attack, oracle, budget, eval_every=budget, progress=False,
                           evaluator=lambda clone: {"clone_accuracy": 0.0})  # fmt: skip
        # What the engine counts is what the optimisers did.
        assert counts["steps"] == result.clone_updates
        allotted = int(rate * result.queries_used / 1000)
        rows[name] = (result.queries_used, counts["steps"], allotted)
    q_dfme, steps_dfme, allotted_dfme = rows["dfme"]
    q_dg, steps_dg, allotted_dg = rows["disguide"]
    # DFME's replay tops up to the allotment; the clones' batches round up by < N updates.
    assert allotted_dfme <= steps_dfme <= allotted_dfme + 1
    assert allotted_dg <= steps_dg <= allotted_dg + clones - 1
    # The same clone steps per query as DFME's, to within the clones' rounding.
    assert abs(steps_dg - steps_dfme * q_dg / q_dfme) <= clones


@pytest.mark.parametrize(
    "name, settings, explanation",
    [
        ("disguide", {"clone_ema": 0.9, "replay_policy": "reservoir"}, None),
        ("dual-students", {"clone_ema": 0.9, "lr_schedule": "multistep"}, None),
        ("disguide-maps", {"clones": 3}, ALL_CLASSES),
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted_and_saves_a_loadable_clone(
    tmp_path, victim, evaluator, name, settings, explanation
):
    budget, every = 2_400, 480
    config = dict(seed=3, batch_size=32, nz=16, ngf=8, replay_size=500, **settings)

    def run_in(folder, oracle, **kwargs):
        return megex.run(
            ATTACKS[name](**config), oracle, budget, evaluator=evaluator, eval_every=every,
            run_dir=tmp_path / folder, progress=False, service_state=oracle.state_dict,
            **kwargs,
        )  # fmt: skip

    straight = run_in("a", LocalOracle(victim, budget=budget, explanation=explanation))

    def interrupt(iteration, spent):
        if spent >= 1_300:
            raise KeyboardInterrupt

    partial = run_in(
        "b", LocalOracle(victim, budget=budget, explanation=explanation), callback=interrupt
    )
    assert not partial.finished
    second = LocalOracle(victim, budget=budget, explanation=explanation)
    second.load_state_dict(RunFolder(tmp_path / "b").load_checkpoint()["service"])
    resumed = run_in("b", second, resume=True)

    assert resumed.finished and resumed.queries_used == straight.queries_used
    assert [m["clone_accuracy"] for m in resumed.metrics] == [
        m["clone_accuracy"] for m in straight.metrics
    ]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["attack"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["attack"]
    assert len(a["other_clones"]) == config.get("clones", 2) - 1
    for saved_a, saved_b in zip([a, *a["other_clones"]], [b, *b["other_clones"]]):
        for part in ("clone", "clone_ema"):
            if part in saved_a:
                assert all(torch.equal(saved_a[part][k], saved_b[part][k]) for k in saved_a[part])
    assert a["clone_ema_updates"] == b["clone_ema_updates"]

    # The saved clone is the evaluated model, and loads by its described architecture.
    from safetensors.torch import load_file

    info = json.loads((tmp_path / "b" / "clone.json").read_text())
    loaded = build_classifier(info["arch"], info["num_classes"], *info["input_shape"][:2])
    loaded.load_state_dict(load_file(str(tmp_path / "b" / "clone.safetensors")))
    assert isinstance(loaded, SoftVote) == (ATTACKS[name].config_class().evaluated == "soft_vote")
    assert evaluator(loaded)["clone_accuracy"] == resumed.clone_accuracy


def test_soft_vote_is_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    members = [build_classifier("small_cnn", 10, 1, 8) for _ in range(3)]
    x = torch.rand(4, 1, 8, 8)
    expected = torch.stack([F.softmax(m(x), dim=1) for m in members]).mean(dim=0).log()
    torch.testing.assert_close(SoftVote(members)(x), expected)
    built = build_classifier("soft_vote_3x_small_cnn", 10, 1, 8)
    assert isinstance(built, SoftVote) and len(built.members) == 3
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("soft_vote_2x_nonsense", 10, 1, 8)


def test_settings_the_attack_cannot_use_are_refused():
    with pytest.raises(SettingError, match="victim_confidence"):
        DisGUIDE(victim_confidence=1.0)
    with pytest.raises(SettingError, match="clones"):
        DualStudents(clones=1)
    with pytest.raises(SettingError, match="explain_clone_queries"):
        DisGUIDEMaps(explain_clone_queries=False)
    with pytest.raises(SettingError, match="discrepancy"):
        DisGUIDE(discrepancy="kl")
