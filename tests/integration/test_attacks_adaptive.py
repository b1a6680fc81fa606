"""The attacker that adapts to a known defence: each adaptation does what it says."""

import pytest
import torch

from megex.attacks import AdaptiveMEGEX, adapt_to
from megex.defenses import ExplanationNoise, ExplanationSign
from megex.engine import run
from megex.explain import Explanation, explain
from megex.oracle import LocalOracle

ALL = Explanation("gradient", target="all")


def _attack(oracle, **settings):
    attack = AdaptiveMEGEX(seed=0, batch_size=16, ngf=8, explanation=ALL, **settings)
    attack.setup(oracle, iterations=10)
    return attack


def test_repeated_maps_average_the_noise_away(digits_victim, digits_test):
    x = digits_test[0][:8]
    honest = explain(digits_victim.eval(), x, ALL)
    errors = {}
    for repeats in (1, 16):
        oracle = LocalOracle(digits_victim, defenses=[ExplanationNoise(2.0)], seed=1)
        attack = _attack(oracle, map_repeats=repeats)
        answer = attack.ask(oracle, x, ALL)
        assert oracle.queries_used == 8 * repeats
        assert answer.explanation.shape == honest.shape
        assert answer.probabilities.shape == (8, 10)
        errors[repeats] = float((answer.explanation - honest).norm() / honest.norm())
    # Noise of 2x each map's std falls by 4x with 16 answers.
    assert errors[16] < 0.4 * errors[1]


def test_maps_of_the_predicted_class_are_that_class_alone(digits_victim, digits_test):
    x = digits_test[0][:6]
    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack(oracle, maps_of="predicted")
    answer = attack.ask(oracle, x, ALL)
    assert answer.explanation_spec.target == "predicted"
    expected = explain(digits_victim.eval(), x, Explanation("gradient", target="predicted"))
    torch.testing.assert_close(answer.explanation, expected)


def test_clone_scale_keeps_the_direction_and_takes_the_clone_norm(digits_victim, digits_test):
    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack(oracle, map_scale="clone")
    x = digits_test[0][:4].clone().requires_grad_(True)
    clone_term = attack.clone(x).sum()
    (clone_grad,) = torch.autograd.grad(clone_term, x, retain_graph=True)
    victim_grad = torch.sign(torch.randn(4, 1, 8, 8))
    scaled = attack.scale_victim_gradient(victim_grad, clone_term, x)
    torch.testing.assert_close(scaled.flatten(1).norm(dim=1), clone_grad.flatten(1).norm(dim=1))
    cosine = torch.nn.functional.cosine_similarity(scaled.flatten(1), victim_grad.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(4))


def _spread(norms):
    """Median over images of the largest class norm over the smallest."""
    return (norms.max(dim=1).values / norms.min(dim=1).values).median()


def test_clone_scale_gives_each_class_map_the_clones_norm(digits_victim, digits_test):
    # Sign maps of every class lose each class's magnitude; d log p_k then divides class k's
    # map by p_k, so without a per-class scale the least likely class dominates.
    x = digits_test[0][:6]
    oracle = LocalOracle(digits_victim, defenses=[ExplanationSign()], seed=0)
    naive, scaled = _attack(oracle), _attack(oracle, map_scale="clone")
    answer = scaled.ask(oracle, x, ALL)
    raw = naive.map_gradients(answer, x)
    adapted = scaled.map_gradients(answer, x)
    xg = x.clone().requires_grad_(True)
    logp = torch.log_softmax(scaled.clone(xg), dim=1)
    clone_norms = torch.stack(
        [
            torch.autograd.grad(logp[:, c].sum(), xg, retain_graph=True)[0].flatten(1).norm(dim=1)
            for c in range(10)
        ],
        dim=1,
    )
    known = raw.flatten(2).norm(dim=2) > 0
    norms = adapted.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms[known], clone_norms[known])
    assert (norms[~known] == 0).all()
    cosine = torch.nn.functional.cosine_similarity(adapted.flatten(2), raw.flatten(2), dim=2)
    torch.testing.assert_close(cosine[known], torch.ones(int(known.sum())))
    # The naive reading is the one the rescale exists for: its classes' norms are far apart.
    assert _spread(raw.flatten(2).norm(dim=2)) > 10 * _spread(clone_norms)
    # Maps of one class keep their magnitudes here (scale_victim_gradient rescales them).
    one = Explanation("gradient", target="predicted")
    single = scaled.ask(oracle, x, one)
    torch.testing.assert_close(scaled.map_gradients(single, x), naive.map_gradients(single, x))


def test_cosine_matching_ignores_the_maps_scale(digits_victim):
    oracle = LocalOracle(digits_victim, seed=0)
    cosine = _attack(oracle, map_matching="cosine")
    relative = _attack(oracle)
    g, t = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(cosine.map_error(g, 100 * t), cosine.map_error(g, t))
    torch.testing.assert_close(cosine.map_error(t, t), torch.zeros(5), atol=1e-6, rtol=0)
    # The default is scale-sensitive: the right direction at 1/100 of the map's scale is
    # nearly as far from it as it can be.
    assert (relative.map_error(t, 100 * t) > 0.9).all()
    torch.testing.assert_close(relative.map_error(t, t), torch.zeros(5))


def test_cosine_matching_gradient_matches_autograd_through_the_clone(digits_victim, digits_test):
    # The loss's gradient in the clone's weights, against finite differences.
    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack(oracle, map_matching="cosine", explanation_loss=1.0)
    attack.clone.double()
    x = digits_test[0][:3].double()
    probs = torch.softmax(torch.randn(3, 10, dtype=torch.float64), dim=1)
    target = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    weights = torch.randn(3, 10, dtype=torch.float64)
    params = [p for p in attack.clone.parameters() if p.requires_grad]
    loss = attack.loss_with_maps(x, probs, target, weights)
    grads = torch.autograd.grad(loss, params)
    p, g = params[-2], grads[-2]
    index = g.abs().flatten().argmax()
    h = 1e-6
    # (The loss takes input gradients itself, so it is evaluated outside no_grad.)
    p.data.view(-1)[index] += h
    up = attack.loss_with_maps(x, probs, target, weights).item()
    p.data.view(-1)[index] -= 2 * h
    down = attack.loss_with_maps(x, probs, target, weights).item()
    p.data.view(-1)[index] += h
    assert (up - down) / (2 * h) == pytest.approx(float(g.view(-1)[index]), rel=1e-4)


def test_zeroth_order_fallback_pays_m_plus_1_queries_per_image(digits_victim):
    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack(
        oracle, generator_gradient="zeroth-order", directions=3, explain_clone_queries=True
    )
    attack.step(oracle)
    assert oracle.queries_used == attack.iteration_cost() == 16 * (4 + 1)
    assert attack.details()["generator_gradient"].startswith("zeroth-order, m=3")


def test_adaptive_run_against_sign_maps_counts_exactly(digits_victim, digits_test):
    oracle = LocalOracle(digits_victim, defenses=[ExplanationSign()], seed=0)
    settings = adapt_to([ExplanationSign()])
    attack = AdaptiveMEGEX(
        seed=0, batch_size=16, ngf=8, explanation=ALL, explain_clone_queries=True, **settings
    )
    result = run(attack, oracle, 640, progress=False)
    assert result.queries_used == oracle.queries_used == 640
    assert result.details["adaptation"]["map_matching"] == "cosine"
    for p in attack.clone.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "defenses, expected",
    [
        ([{"name": "noise", "scale": 0.5}], {"map_repeats": 4}),
        ([{"name": "sign"}], {"map_scale": "clone", "map_matching": "cosine"}),
        ([{"name": "withhold", "fraction": 0.6}], {"generator_gradient": "zeroth-order"}),
        ([{"name": "withhold", "fraction": 0.2}], {}),
        ([{"name": "round", "decimals": 2}], {}),
        ([{"name": "reverse-sigmoid"}], {"answers_as": "labels"}),
        ([{"name": "reverse-sigmoid", "keep_label": False}], {}),
        ([{"name": "reverse-sigmoid", "keep_label": "false"}], {}),
        (
            [{"name": "laplace", "scale": 1.0}, {"name": "topk", "fraction": 0.1}],
            {"map_repeats": 4, "map_scale": "clone", "map_matching": "cosine"},
        ),
    ],
)
def test_adapt_to_declared_defenses(defenses, expected):
    assert adapt_to(defenses) == expected


def test_adapt_to_reads_defense_objects():
    assert adapt_to([ExplanationNoise(0.5)]) == {"map_repeats": 4}
