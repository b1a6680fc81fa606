"""The attacker with images that knows the defence (knockoff-maps-adaptive): with nothing to
adapt to it is knockoff-maps; each adaptation against autograd or a measurement; its rows in
the trade-off, planned, run and reported; its refusals."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from bench_support import untrained_victims

# The pool attacks' helpers (an attack stepped against a LocalOracle, every class's
# d log p / dx by autograd).
from test_pool_attacks import ALL, HALF, PREDICTED, _log_p_gradients, _stepped, _untimed

import megex
from megex import LocalOracle, data
from megex.attacks import AdaptiveKnockoffMaps, KnockoffMaps
from megex.cli import main
from megex.cli.studies import add_tradeoff_arguments
from megex.defenses import (
    ExplanationSign,
    GaussianNoise,
    LabelOnly,
    PredictedClassOnly,
    ReverseSigmoid,
)
from megex.evaluate import Evaluator
from megex.experiments import tradeoff
from megex.experiments.methods import build_attack


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    """60 digits training images (the pool of the pool attacks' tests)."""
    return data.load("digits").train_tensors()[0][:60]


def _behind(defenses, victim, pool, steps=1, **settings):
    """An adaptive attack after `steps` requests to a service that explains every class
    behind `defenses` (no clone update yet)."""
    oracle = LocalOracle(victim, budget=10_000, explanation=ALL, defenses=defenses, seed=1)
    attack = AdaptiveKnockoffMaps(pool, seed=0, query_batch=20, **settings)
    attack.setup(oracle, 10)
    for _ in range(steps):
        attack.step(oracle)
    return attack, oracle


# --- with every adaptation off, it is knockoff-maps -----------------------------------------


def test_with_every_adaptation_off_it_is_knockoff_maps(digits_victim, digits_test, pool):
    naive, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation_loss=0.7)
    adaptive, _ = _stepped(AdaptiveKnockoffMaps, digits_victim, pool, explanation_loss=0.7)
    assert adaptive.iteration_cost() == naive.iteration_cost() == 20
    for field in ("images", "probs", "maps", "classes"):
        assert torch.equal(adaptive.store.get(field), naive.store.get(field)), field
    batch = naive.store.sample(16, naive.rng)
    same = adaptive.store.sample(16, adaptive.rng)
    assert all(torch.equal(batch[k], same[k]) for k in batch)
    assert torch.equal(adaptive.clone_loss(same), naive.clone_loss(batch))

    x, y = digits_test
    evaluator = Evaluator.from_victim(digits_victim, x, y)
    settings = dict(seed=3, query_batch=20, batch_size=16, clone_updates_per_1k_queries=250)
    results = {}
    for attack_class in (KnockoffMaps, AdaptiveKnockoffMaps):
        attack = attack_class(pool, training="streaming", **settings)
        oracle = LocalOracle(digits_victim, budget=120, explanation=ALL)
        results[attack_class] = megex.run(
            attack, oracle, 120, evaluator=evaluator, eval_every=40, progress=False
        )
    naive_run, adaptive_run = results[KnockoffMaps], results[AdaptiveKnockoffMaps]
    assert _untimed(adaptive_run.metrics) == _untimed(naive_run.metrics)
    assert len(adaptive_run.metrics) == 3 and adaptive_run.queries_used == 120
    for a, b in zip(
        adaptive_run.clone.state_dict().values(), naive_run.clone.state_dict().values()
    ):
        assert torch.equal(a, b)
    assert adaptive_run.details["adaptation"] == {
        "map_repeats": 1, "map_scale": "returned", "map_matching": "relative",
        "maps_of": "returned", "answers_as": "probabilities",
    }  # fmt: skip


# --- cosine matching and the clone's norms, against autograd ------------------------------


def _projection(attack, batch):
    """(v, sum_k v_k maps_k): the projection over classes the next clone_loss draws from the
    attack's generator (without drawing it), and the projected maps; a class whose map is
    all zeros (unknown) gets weight 0."""
    redraw = torch.Generator().set_state(attack.rng.get_state())
    maps = batch["maps"]
    n, k = maps.shape[:2]
    v = torch.randn(n, k, generator=redraw) * maps.flatten(2).ne(0).any(dim=-1)
    return v, (v.view(n, k, 1, 1, 1) * maps).sum(dim=1)


def test_cosine_map_term_is_one_minus_cosine_to_the_clones_input_gradient(digits_victim, pool):
    attack, _ = _stepped(
        AdaptiveKnockoffMaps, digits_victim, pool, explanation_loss=0.7, map_matching="cosine"
    )
    batch = attack.store.sample(16, attack.rng)
    v, target = _projection(attack, batch)
    loss = attack.clone_loss(batch)

    # By hand: KL(victim || clone) + 0.7 * mean over images of 1 - cos(g, t), with
    # g = d(sum_k v_k log pS_k)/dx by autograd, the pixels no map tells left out of g.
    x = batch["images"].detach().clone().requires_grad_(True)
    log_ps = F.log_softmax(attack.clone(x), dim=1)
    p = batch["probs"].clamp_min(1e-8)
    p = p / p.sum(dim=1, keepdim=True)
    kl = (p * (p.log() - log_ps)).sum(dim=1).mean()
    (g,) = torch.autograd.grad((v * log_ps).sum(), x, create_graph=True)
    g = (g * (target != 0)).flatten(1)
    t = target.flatten(1)
    cosine = (g * t).sum(dim=1) / (g.norm(dim=1) * t.norm(dim=1))
    expected = kl + 0.7 * (1 - cosine).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float((loss - kl).detach()) > 0.1  # the map term is there
    # The map term trains the clone (double backward): the same parameter gradients.
    params = list(attack.clone.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A direction only: the maps at any scale give the same loss.
    scaled = {**batch, "maps": 1000 * batch["maps"]}
    redraw = attack.rng.get_state()
    first = attack.clone_loss(batch)
    attack.rng.set_state(redraw)
    torch.testing.assert_close(attack.clone_loss(scaled), first)


def test_clone_scale_gives_each_class_map_the_clones_norm(digits_victim, pool):
    naive, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation_loss=0.7)
    attack, _ = _stepped(
        AdaptiveKnockoffMaps, digits_victim, pool, explanation_loss=0.7, map_scale="clone"
    )
    # Kept as directions: each class's map that knockoff-maps knows at unit norm, along the
    # victim's d log p_k / dx (in float32: a small map's float16 copy is less exact).
    kept, honest = attack.store.get("maps").float(), naive.store.get("maps").float()
    known = honest.flatten(2).norm(dim=2) > 0
    assert bool(known.any()) and not bool(known.all())
    norms = kept.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms[known], torch.ones(int(known.sum())), **HALF)
    assert (norms[~known] == 0).all()
    truth = _log_p_gradients(digits_victim.eval(), attack.store.get("images"))
    cosine = F.cosine_similarity(kept.flatten(2), truth.flatten(2), dim=2)
    torch.testing.assert_close(cosine[known], torch.ones(int(known.sum())), **HALF)

    # At each update each class's map takes the norm of the clone's own d log pS_k / dx
    # (explained in eval mode, like the victim), by autograd here.
    batch = attack.store.sample(16, attack.rng)
    attack.clone.eval()
    clone_maps = _log_p_gradients(attack.clone, batch["images"])
    attack.clone.train()
    clone_norms = clone_maps.flatten(2).norm(dim=2)
    maps = batch["maps"]
    current = maps.flatten(2).norm(dim=2)
    ratio = torch.where(current > 0, clone_norms / current.clamp_min(1e-12), 0.0)
    by_hand = maps * ratio.view(*ratio.shape, 1, 1, 1)
    state = attack.rng.get_state()
    loss = attack.clone_loss(batch)
    attack.rng.set_state(state)
    # knockoff-maps' own loss (no adaptation) on the maps given those norms by hand.
    expected = KnockoffMaps.clone_loss(attack, {**batch, "maps": by_hand})
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    attack.rng.set_state(state)
    unscaled = KnockoffMaps.clone_loss(attack, batch)
    assert abs(float((unscaled - loss).detach())) > 1e-3  # the norms were changed


def test_clone_scale_keeps_sign_maps_finite(digits_victim, pool):
    # A sign map read as d log p_k divides by p_k (down to 1e-8): beyond float16's range,
    # where the answers are kept, unless only the direction is kept.
    attack, _ = _behind([ExplanationSign()], digits_victim, pool, map_scale="clone")
    maps = attack.store.get("maps").float()
    assert torch.isfinite(maps).all() and bool(maps.ne(0).any())
    loss = attack.clone_loss(attack.store.sample(16, attack.rng))
    assert torch.isfinite(loss)


# --- repeated answers, and maps of the predicted class --------------------------------------


def test_repeated_maps_cost_a_query_each_and_average_the_noise(digits_victim, pool):
    honest, _ = _behind([], digits_victim, pool)
    truth = honest.store.get("maps").float()
    errors = {}
    for repeats in (1, 4):
        attack, oracle = _behind([GaussianNoise(2.0)], digits_victim, pool, map_repeats=repeats)
        # 20 pool images, each sent `repeats` times: every copy is charged.
        assert oracle.queries_used == 20 * repeats == attack.iteration_cost()
        assert len(attack.store) == 20
        assert torch.equal(attack.store.get("images"), honest.store.get("images"))
        assert torch.equal(attack.store.get("probs"), honest.store.get("probs"))
        errors[repeats] = float((attack.store.get("maps").float() - truth).norm() / truth.norm())
    # Noise twice the map's norm; the mean of 4 answers has half its norm.
    assert 1.5 < errors[1] < 2.5
    assert errors[4] < 0.6 * errors[1]

    # A whole run: the loop's steps cost 80 queries each, and the oracle counts them all.
    attack = AdaptiveKnockoffMaps(
        pool, seed=0, query_batch=20, map_repeats=4, clone_updates_per_1k_queries=100
    )
    oracle = LocalOracle(digits_victim, budget=200, explanation=ALL, defenses=[GaussianNoise(2.0)])
    result = megex.run(attack, oracle, 200, progress=False)
    assert result.queries_used == oracle.queries_used == 160
    assert len(attack.store) == 40 and result.details["adaptation"]["map_repeats"] == 4


def test_maps_of_the_predicted_class_are_read_as_that_class_alone(digits_victim, pool):
    attack, _ = _behind([PredictedClassOnly()], digits_victim, pool, maps_of="predicted")
    assert attack.store.map_shape == (1, 8, 8)
    assert attack.explanation_used.target == "predicted"
    images, probs = attack.store.get("images"), attack.store.get("probs")
    classes = attack.store.get("classes")
    assert torch.equal(classes, probs.argmax(dim=1))
    truth = _log_p_gradients(digits_victim.eval(), images)[torch.arange(20), classes]
    torch.testing.assert_close(attack.store.get("maps").float(), truth, **HALF)
    # The same as knockoff-maps answered with the predicted class's map.
    one, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation=PREDICTED)
    torch.testing.assert_close(attack.store.get("maps"), one.store.get("maps"), **HALF)


def test_answers_behind_reverse_sigmoid_are_read_as_the_label_it_keeps(digits_victim, pool):
    attack, _ = _behind([ReverseSigmoid()], digits_victim, pool, answers_as="labels")
    probs = attack.store.get("probs")
    with torch.no_grad():
        truth = digits_victim.eval()(attack.store.get("images").float()).argmax(dim=1)
    assert torch.equal(probs, F.one_hot(truth, 10).to(probs.dtype))
    # So it keeps what a label-only service gives the naive attacker: the same labels and
    # the same maps (the top class's, read through a probability of 1).
    plain, _ = _behind([LabelOnly()], digits_victim, pool)
    assert torch.equal(plain.store.get("probs"), probs)
    torch.testing.assert_close(attack.store.get("maps"), plain.store.get("maps"), **HALF)
    # Read as they come, the perturbed probabilities are not one-hot.
    naive, _ = _behind([ReverseSigmoid()], digits_victim, pool)
    assert not torch.equal(naive.store.get("probs"), probs)


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, value",
    [
        ("map_scale", "banana"),
        ("map_repeats", 0),
        ("map_matching", "l2"),
        ("maps_of", "all"),
        ("answers_as", "logits"),
    ],
)
def test_bad_adaptations_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        AdaptiveKnockoffMaps(torch.rand(10, 1, 8, 8), **{setting: value})


def test_the_generator_fallback_is_not_a_setting_of_the_attacker_with_images():
    with pytest.raises(TypeError, match="unknown setting 'generator_gradient'"):
        AdaptiveKnockoffMaps(torch.rand(10, 1, 8, 8), generator_gradient="zeroth-order")


def test_the_cli_lists_its_adaptations(capsys):
    assert main(["settings", "--method", "knockoff-maps-adaptive"]) == 0
    listed = capsys.readouterr().out
    for name in ("map_repeats", "map_scale", "map_matching", "maps_of", "answers_as", "selection"):
        assert name in listed
    assert "generator_gradient" not in listed


# --- its rows in the trade-off ------------------------------------------------------------

POOL_ROWS = [
    [], ["quantize:bits=2"], ["gaussian:2"], ["predicted-only"], ["withhold:0.9"],
    ["gaussian:2", "withhold:0.9"], ["label-only"], ["reverse-sigmoid"],
]  # fmt: skip


def test_the_tradeoff_plans_the_adaptive_attacker_with_images_where_it_adapts(tmp_path):
    config = tradeoff.load_config(None)
    config.update(
        dataset="digits", attackers=["megex-all", "knockoff-maps"], baseline="knockoff",
        pool="digits:unseen:100", budgets=[300], eval_at=[], seeds=[0], victim_seeds=[0],
        tuned_settings=None, defenses=POOL_ROWS,
    )  # fmt: skip
    args = add_tradeoff_arguments(argparse.ArgumentParser()).parse_args([])
    jobs = tradeoff.plan(config, args, tmp_path, {0: tmp_path / "victim.safetensors"})
    planned = {(job["method"], job["defense_row"]): job for job in jobs}
    adaptive = {row for method, row in planned if method == "knockoff-maps+adaptive"}
    assert adaptive == {
        "quantize:bits=2",
        "gaussian:2",
        "predicted-only",
        "gaussian:2+withhold:0.9",
        "reverse-sigmoid",
    }
    naive = planned["knockoff-maps", "gaussian:2"]["settings"]

    def added(row):
        """The settings the adaptive job adds to the naive method's, which it keeps."""
        job = planned["knockoff-maps+adaptive", row]
        assert job["attack"] == "knockoff-maps-adaptive"
        assert {k: job["settings"][k] for k in naive} == naive
        return {k: v for k, v in job["settings"].items() if k not in naive}

    assert added("quantize:bits=2") == {"map_scale": "clone", "map_matching": "cosine"}
    assert added("gaussian:2") == {"map_repeats": 4}
    assert added("predicted-only") == {"maps_of": "predicted"}
    assert added("reverse-sigmoid") == {"answers_as": "labels"}
    # Reading answers as labels is the attacker with images' adaptation alone: the data-free
    # one learns less from labels, so it has no adaptive row there.
    assert ("megex-all+adaptive", "reverse-sigmoid") not in planned
    # The generator's fallback against withheld maps is dropped: this attacker has none.
    assert added("gaussian:2+withhold:0.9") == {"map_repeats": 4}
    assert planned["megex-all+adaptive", "withhold:0.9"]["settings"]["generator_gradient"] == (
        "zeroth-order"
    )
    for row in adaptive:
        job = planned["knockoff-maps+adaptive", row]
        attack = build_attack(job["attack"], job["settings"], 0, "cpu", torch.rand(10, 1, 8, 8))
        assert isinstance(attack, AdaptiveKnockoffMaps)


def test_a_tradeoff_runs_and_reports_the_adaptive_attacker_with_images(tmp_path):
    out = tmp_path / "out"
    untrained_victims(out, [0], 200)
    doc = {
        "dataset": "digits", "validation_images": 200, "victim_seeds": [0], "seeds": [0],
        "pool": "digits:seen:60", "budgets": [80], "eval_at": [], "attackers": ["knockoff-maps"],
        "baseline": "knockoff", "utility_images": 20, "tuned_settings": None,
        "settings": {"clone_updates_per_1k_queries": 250.0, "query_batch": 20},
        "defenses": [[], ["sign"], ["gaussian:2"], ["withhold:0.9"]],
    }  # fmt: skip
    path = tmp_path / "tradeoff.json"
    path.write_text(json.dumps(doc))
    argv = ["tradeoff", "--config", str(path), "--out", str(out), "--no-progress", "--no-plot"]
    assert main(argv) == 0
    runs = {p.name.rsplit("-v", 1)[0]: p for p in (out / "runs").iterdir()}
    assert set(runs) == {
        "knockoff-none", "knockoff-maps-none", "knockoff-maps-sign",
        "knockoff-maps+adaptive-sign", "knockoff-maps-gaussian_2",
        "knockoff-maps+adaptive-gaussian_2", "knockoff-maps-withhold_0.9",
    }  # fmt: skip
    noisy = json.loads((runs["knockoff-maps+adaptive-gaussian_2"] / "result.json").read_text())
    # 4 answers per image: 20 images at 80 queries.
    assert noisy["queries_used"] == 80 and noisy["details"]["answers_kept"] == 20
    summary = json.loads((out / "tradeoff.json").read_text())
    rows = {r["defense"]: r["methods"] for r in summary["rows"]}
    for row in ("sign", "gaussian:2"):
        variants = [rows[row]["knockoff-maps"], rows[row]["knockoff-maps+adaptive"]]
        assert sum(bool(v.get("counted")) for v in variants) == 1
    assert "knockoff-maps+adaptive" not in rows["withhold:0.9"]
    assert rows["withhold:0.9"]["knockoff-maps"]["counted"]
    table = (out / "tradeoff.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| defence"))
    assert "| knockoff-maps | knockoff-maps+adaptive | knockoff |" in header
    withhold = next(line for line in table.splitlines() if line.startswith("| withhold:0.9 |"))
    assert "= naive" in withhold
