"""Defences: the registry and its specs, what each defence does to predictions and maps,
their randomness, and how the oracle and `megex attack` / `megex defenses` apply them."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import images, tiny_victim

from megex import Explanation, ExplanationNotOffered, LocalOracle, explain
from megex.cli import build_parser, main
from megex.defenses import (
    DEFENSES,
    SIDES,
    Coarsen,
    Defense,
    GaussianNoise,
    LabelOnly,
    LaplaceNoise,
    PredictedClassOnly,
    Quantize,
    ReverseSigmoid,
    SmoothGradDefense,
    TopClasses,
    Withhold,
    build_defense,
    build_defenses,
    describe_defenses,
)
from megex.oracle import Responder

torch.set_num_threads(1)

CLASSES = list(dict.fromkeys(DEFENSES.values()))
EXPLANATION_SIDE = [c for c in CLASSES if c.side == "explanation"]
PREDICTION_SIDE = [c for c in CLASSES if c.side == "prediction"]


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


# --- the registry and specs ---------------------------------------------------------------


def test_the_registry_describes_every_defense():
    described = describe_defenses()
    assert json.loads(json.dumps(described)) == described
    names = [d["name"] for d in described]
    assert len(names) == len(set(names)) == len(CLASSES)
    for entry in described:
        cls = DEFENSES[entry["name"]]
        assert entry["side"] in SIDES and entry["summary"]
        # The constructor's defaults are the declared ones, in the declared order.
        signature = inspect.signature(cls.__init__).parameters
        declared = [(p["name"], p["default"]) for p in entry["params"]]
        if declared:
            assert [(n, signature[n].default) for n, _ in declared] == declared
        for param in entry["params"]:
            assert param["rule"] and param["help"] and param["type"] in ("int", "float", "bool")
    assert {d["name"] for d in described if d["side"] == "prediction"} == {
        "round",
        "top-classes",
        "label-only",
        "reverse-sigmoid",
    }
    assert next(d for d in described if d["name"] == "gaussian")["aliases"] == ["noise"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_a_spec_builds_the_defense_again(cls):
    defense = cls()
    again = build_defense(defense.spec())
    assert type(again) is cls and again.values() == defense.values()
    assert defense.to_dict() == {"name": cls.name, "side": cls.side, **defense.values()}


def test_the_spec_forms():
    assert build_defense("round:2").values() == {"decimals": 2}
    noise = build_defense("noise:0.5")
    assert isinstance(noise, GaussianNoise) and noise.scale == 0.5
    assert build_defense("topk:0.1").values() == {"fraction": 0.1}
    assert build_defense("sign").spec() == "sign"
    assert build_defense("laplace:scale=0.25").values() == {"scale": 0.25}
    assert build_defense("quantize:bits=4").values() == {"bits": 4}
    rs = build_defense("reverse-sigmoid:beta=0.5,gamma=0.2")
    assert rs.values() == {"beta": 0.5, "gamma": 0.2, "keep_label": True}
    assert build_defense(" reverse_sigmoid : beta = 2 , keep_label = false ").values() == {
        "beta": 2.0,
        "gamma": 0.1,
        "keep_label": False,
    }
    assert build_defense("smooth:sigma=0.2,samples=4").values() == {"sigma": 0.2, "samples": 4}
    precise = GaussianNoise(scale=0.123456789)
    assert build_defense(precise.spec()).scale == precise.scale  # specs are exact
    assert [d.name for d in build_defenses(["withhold:0.5", "coarsen:patch=3"])] == [
        "withhold",
        "coarsen",
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blur", "defense: unknown 'blur'; expected one of round,"),
        ("noise:lots", "defense 'gaussian': parameter 'scale': expected a number >= 0, got 'lots'"),
        ("quantize:bits=1", "defense 'quantize': parameter 'bits': expected a whole number"),
        ("quantize:bits=2.5", "parameter 'bits': expected a whole number in 2..16, got '2.5'"),
        ("laplace:scale=-1", "defense 'laplace': parameter 'scale': expected a number >= 0"),
        ("reverse-sigmoid:beta=0", "parameter 'beta': expected a number > 0, got '0'"),
        ("reverse-sigmoid:keep_label=maybe", "parameter 'keep_label': expected true or false"),
        ("topk:frac=0.1", "defense 'topk': unknown parameter 'frac'; expected fraction"),
        ("topk:fraction=0", "parameter 'fraction': expected a number in (0, 1]"),
        ("withhold:fraction=2", "parameter 'fraction': expected a number in [0, 1]"),
        ("coarsen:patch=2,patch=3", "parameter 'patch' given twice"),
        ("coarsen:patch=", "expected param=value pairs"),
        ("sign:1", "defense 'sign' takes no parameters"),
        ("round:", "nothing after ':'"),
        ("gaussian:inf", "expected a number >= 0, got 'inf'"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_defense_and_parameter(spec, message):
    with pytest.raises(ValueError) as info:
        build_defense(spec)
    assert message in str(info.value)


def test_constructors_check_their_parameters():
    with pytest.raises(ValueError, match="parameter 'bits'"):
        Quantize(bits=40)
    with pytest.raises(ValueError, match="unknown parameter 'scale'"):
        Defense(scale=1)
    with pytest.raises(
        ValueError, match="defense 'quantize': unknown parameter 'scale'; expected bits"
    ):
        Quantize(scale=1)
    # Values are typed by their declaration, from Python values or text.
    assert Quantize(bits=3.0).bits == 3 and isinstance(Quantize(bits=3.0).bits, int)
    assert GaussianNoise(scale="0.25").scale == 0.25 and GaussianNoise(1).scale == 1.0
    assert ReverseSigmoid(keep_label="off").keep_label is False


# --- every explanation defence: shapes, dtypes, randomness --------------------------------


@pytest.mark.parametrize("cls", EXPLANATION_SIDE, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explanation_defenses_keep_shapes_and_dtypes(cls, dtype):
    labels = torch.tensor([3, 0, 9])
    for maps, target in (
        (torch.randn(3, 1, 8, 8, dtype=dtype), "predicted"),
        (torch.randn(3, 10, 2, 5, 7, dtype=dtype), "all"),
    ):
        out = cls().explanation(
            maps, generator=torch.Generator().manual_seed(0), labels=labels, target=target
        )
        assert out.shape == maps.shape and out.dtype == maps.dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", EXPLANATION_SIDE, ids=lambda c: c.name)
def test_randomness_comes_only_from_the_generator(cls):
    maps = torch.randn(6, 10, 1, 8, 8)
    labels = torch.arange(6)
    before = torch.get_rng_state()

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return cls().explanation(maps, generator=generator, labels=labels, target="all")

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(first, again)
    if cls in (GaussianNoise, LaplaceNoise, Withhold):
        assert not torch.equal(first, other)


@pytest.mark.parametrize("cls", [GaussianNoise, LaplaceNoise])
def test_noise_is_scaled_to_each_maps_norm(cls):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 64, 64)
    maps[1] *= 1000  # a strength means the same on any scale
    noisy = cls(scale=0.5).explanation(maps, generator=generator)
    ratio = (noisy - maps).flatten(1).norm(dim=1) / maps.flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full((2,), 0.5), rtol=0.03, atol=0)
    zero = torch.zeros(1, 1, 8, 8)
    assert torch.equal(cls(scale=2.0).explanation(zero, generator=generator), zero)
    assert torch.equal(cls(scale=0.0).explanation(maps, generator=generator), maps)


def test_quantize_is_symmetric_with_k_bits():
    maps = torch.randn(4, 2, 16, 16)
    out = Quantize(bits=3).explanation(maps)
    peak = maps.abs().amax(dim=(1, 2, 3), keepdim=True)
    step = peak / 3  # 2^(3-1) - 1 levels on each side
    levels = torch.round(out / step)
    assert torch.allclose(levels, levels.round()) and levels.abs().max() <= 3
    assert ((out - maps).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(out.abs().amax(dim=(1, 2, 3), keepdim=True), peak)
    assert torch.equal(Quantize(bits=3).explanation(-maps), -out)  # symmetric around 0
    zero = torch.zeros(1, 1, 4, 4)
    assert torch.equal(Quantize(bits=2).explanation(zero), zero)


def test_coarsen_averages_patches_and_keeps_the_shape():
    maps = torch.arange(2 * 8 * 7, dtype=torch.float32).view(1, 2, 8, 7)
    out = Coarsen(patch=3).explanation(maps)
    assert out.shape == maps.shape
    for c in range(2):
        for top in range(0, 8, 3):
            for left in range(0, 7, 3):
                patch = maps[0, c, top : top + 3, left : left + 3]
                got = out[0, c, top : top + 3, left : left + 3]
                assert torch.allclose(got, patch.mean().expand_as(got))  # edge patches too
    assert torch.equal(Coarsen(patch=1).explanation(maps), maps)
    everything = Coarsen(patch=100).explanation(maps)
    assert torch.allclose(everything[0, 0], maps[0, 0].mean().expand(8, 7))


def test_withhold_zeroes_whole_images_for_a_fraction():
    maps = torch.randn(400, 10, 1, 4, 4) + 5  # no value is 0
    generator = torch.Generator().manual_seed(0)
    out = Withhold(fraction=0.3).explanation(maps, generator=generator)
    withheld = (out == 0).flatten(1).all(dim=1)
    shown = (out == maps).flatten(1).all(dim=1)
    assert (withheld | shown).all()  # an image loses every class's map or none
    assert 90 <= int(withheld.sum()) <= 150  # binomial(400, 0.3): 120 +- 3 sd
    assert torch.equal(Withhold(fraction=0.0).explanation(maps, generator=generator), maps)
    assert not Withhold(fraction=1.0).explanation(maps, generator=generator).any()


def test_predicted_only_keeps_the_predicted_class():
    maps = torch.randn(3, 10, 1, 4, 4)
    labels = torch.tensor([2, 7, 2])
    out = PredictedClassOnly().explanation(maps, labels=labels, target="all")
    for i, label in enumerate(labels.tolist()):
        assert torch.equal(out[i, label], maps[i, label])
        assert not out[i, [k for k in range(10) if k != label]].any()
    one = maps[:, 0]
    assert torch.equal(PredictedClassOnly().explanation(one, labels=labels), one)
    of_two = PredictedClassOnly().explanation(one, labels=labels, target=2)
    assert torch.equal(of_two[[0, 2]], one[[0, 2]]) and not of_two[1].any()
    with pytest.raises(ValueError, match="needs the predicted labels"):
        PredictedClassOnly().explanation(maps)


def test_top_k_sparsifies_and_sign_keeps_direction():
    maps = torch.randn(2, 1, 8, 8)
    sparse = DEFENSES["topk"](fraction=0.25).explanation(maps)
    assert ((sparse != 0).flatten(1).sum(1) == 16).all()
    kept = maps.abs().flatten(1).topk(16).values[:, -1:]
    assert torch.equal(sparse.flatten(1), maps.flatten(1) * (maps.abs().flatten(1) >= kept))
    assert torch.equal(DEFENSES["sign"]().explanation(maps), torch.sign(maps))


# --- prediction defences: the predicted label stays on top ---------------------------------

PREDICTION_VARIANTS = [
    cls(**kwargs)
    for cls, kwargs in [
        (DEFENSES["round"], {"decimals": 0}),
        (DEFENSES["round"], {"decimals": 2}),
        (TopClasses, {"k": 1}),
        (TopClasses, {"k": 3}),
        (LabelOnly, {}),
        (ReverseSigmoid, {}),
        (ReverseSigmoid, {"beta": 0.5, "gamma": 0.2}),
        (ReverseSigmoid, {"beta": 3.0, "gamma": 1.0}),
        (ReverseSigmoid, {"beta": 0.7, "gamma": 5.0}),
    ]
]


def test_every_prediction_defense_is_exercised():
    assert {type(d) for d in PREDICTION_VARIANTS} == set(PREDICTION_SIDE)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(2, 12),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 60.0),
    ties=st.booleans(),
)
def test_prediction_defenses_keep_the_predicted_label(n, k, seed, scale, ties):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    if ties:
        logits = logits.round()
    labels = logits.argmax(dim=1)
    p = torch.softmax(logits, dim=1)
    for defense in PREDICTION_VARIANTS:
        out = defense.probabilities(p, labels=labels, generator=torch.Generator())
        assert out.shape == p.shape and out.dtype == p.dtype, defense
        assert torch.isfinite(out).all() and (out >= 0).all(), defense
        assert defense.keeps_label
        top = out.gather(1, labels.view(-1, 1)).squeeze(1)
        assert (top >= out.amax(dim=1)).all(), (defense, p, out)
        if isinstance(defense, ReverseSigmoid):
            torch.testing.assert_close(out.sum(1), torch.ones(n))


def test_reverse_sigmoid_is_lee_et_al_formula():
    p = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    beta, gamma = 0.5, 0.2
    y = p.numpy()
    r = beta * (1 / (1 + np.exp(-gamma * np.log(y / (1 - y)))) - 0.5)
    want = np.clip(y - r, 0, None)
    want = want / want.sum(axis=1, keepdims=True)
    got = ReverseSigmoid(beta=beta, gamma=gamma, keep_label=False).probabilities(p)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_reverse_sigmoid_can_change_the_label_only_when_told():
    # gamma = 1: r(y) = beta (y - 1/2), so beta > 1 reverses the order of the classes.
    p = torch.tensor([[0.7, 0.2, 0.1]])
    flipped = ReverseSigmoid(beta=2.0, gamma=1.0, keep_label=False)
    assert not flipped.keeps_label and int(flipped.probabilities(p).argmax()) != 0
    kept = ReverseSigmoid(beta=2.0, gamma=1.0).probabilities(p, labels=torch.tensor([0]))
    assert int(kept.argmax()) == 0
    described = {d["name"]: d for d in describe_defenses()}
    assert described["reverse-sigmoid"]["keeps_label"] is True


def test_top_classes_and_label_only():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.4, 0.1, 0.1]])
    labels = torch.tensor([1, 1])  # row 2: a tie at the top, the victim's class is 1
    top1 = TopClasses(k=1).probabilities(p, labels=labels)
    assert torch.equal(top1, torch.tensor([[0, 0.5, 0, 0], [0, 0.4, 0, 0]]))
    top2 = TopClasses(k=2).probabilities(p, labels=labels)
    assert torch.equal(top2[0], torch.tensor([0, 0.5, 0.3, 0]))
    assert torch.equal(TopClasses(k=4).probabilities(p), p)
    assert torch.equal(
        LabelOnly().probabilities(p, labels=labels), torch.tensor([[0.0, 1, 0, 0]] * 2)
    )


# --- through the oracle -------------------------------------------------------------------


def test_the_oracle_applies_defenses_in_order(victim):
    x = images(5, seed=1)
    specs = ["quantize:bits=3", "gaussian:0.2", "withhold:0.4", "reverse-sigmoid"]
    answer = LocalOracle(victim, defenses=build_defenses(specs), seed=7).query(x, True)
    plain = LocalOracle(victim).query(x, True)
    generator = torch.Generator().manual_seed(7)
    expected_p = plain.probabilities
    expected_e = plain.explanation
    for defense in build_defenses(specs):
        expected_p = defense.probabilities(expected_p, labels=plain.labels, generator=generator)
    for defense in build_defenses(specs):
        expected_e = defense.explanation(
            expected_e, generator=generator, labels=plain.labels, target="predicted"
        )
    torch.testing.assert_close(answer.probabilities, expected_p)
    torch.testing.assert_close(answer.explanation, expected_e)
    assert torch.equal(answer.labels, plain.labels)
    # The same seed gives the same answers: a service that restarts from its state agrees.
    again = LocalOracle(victim, defenses=build_defenses(specs), seed=7).query(x, True)
    assert torch.equal(again.explanation, answer.explanation)


def test_prediction_defenses_are_refused_with_logits_or_labels(victim):
    for spec in ("round:2", "top-classes:2", "label-only", "reverse-sigmoid"):
        for mode in ("logits", "label"):
            with pytest.raises(ValueError, match=f"does not apply to prediction='{mode}'"):
                LocalOracle(victim, prediction=mode, defenses=[build_defense(spec)])
    with pytest.raises(ValueError, match="expected Defense objects"):
        LocalOracle(victim, defenses=["round:2"])


def test_predicted_only_through_the_oracle(victim):
    x = images(4, seed=2)
    spec = Explanation(target="all")
    answer = LocalOracle(victim, defenses=[PredictedClassOnly()]).query(x, spec)
    plain = LocalOracle(victim).query(x, spec)
    rows = torch.arange(4)
    assert torch.equal(
        answer.explanation[rows, plain.labels], plain.explanation[rows, plain.labels]
    )
    assert int((answer.explanation.flatten(2) != 0).any(dim=2).sum()) <= 4


def test_smoothing_computes_smoothgrad_and_says_what_was_asked(victim):
    x = images(3, seed=3)
    smooth = SmoothGradDefense(sigma=0.2, samples=4)
    oracle = LocalOracle(victim, defenses=[smooth], seed=5)
    asked = Explanation("gradient", target="all", output="log_probability")
    answer = oracle.query(x, asked)
    computed = Explanation("smoothgrad", target="all", output="log_probability", sigma=0.2,
                           samples=4)  # fmt: skip
    want = explain(victim, x, computed, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(answer.explanation, want)
    assert answer.explanation_spec == asked
    # A SmoothGrad request gets at least the defence's noise and samples.
    stronger = smooth.computed_explanation(Explanation("smoothgrad", sigma=0.5, samples=2))
    assert stronger.params == {"sigma": 0.5, "samples": 4}
    # Its compute is SmoothGrad's: 1 forward + 4 x (1 forward + 10 backward) per image.
    assert oracle.responder.passes_per_image(asked) == 1 + 4 * 11
    assert oracle.responder.passes_per_image(None) == 1
    # Methods it cannot smooth are not offered, and cost nothing.
    with pytest.raises(ExplanationNotOffered, match="defense 'smooth': applies to gradient"):
        oracle.query(x, Explanation("integrated_gradients"))
    assert oracle.queries_used == 3
    with pytest.raises(ValueError, match="not input_x_gradient"):
        Responder(victim, explanation=Explanation("input_x_gradient"), defenses=[smooth])


# --- the command line ---------------------------------------------------------------------


def test_megex_defenses_lists_them(capsys):
    assert main(["defenses", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == describe_defenses()
    assert main(["defenses"]) == 0
    text = capsys.readouterr().out
    assert "[prediction]" in text and "[explanation]" in text
    assert "gaussian (also noise):" in text and "bits=4  bits per value" in text


def test_megex_attack_applies_its_defenses_in_process(tmp_path, victim):
    from megex.cli.attack import _oracle

    path = str(victim.save(tmp_path / "v.safetensors"))
    argv = ["attack", "--victim", path, "--budget", "100", "--out", str(tmp_path / "r")]
    argv += ["--defense", "label-only", "--defense", "withhold:fraction=1", "--seed", "3"]
    args = build_parser().parse_args(argv)
    oracle = _oracle(args, Explanation(target="all"), None)[0]
    assert [d.spec() for d in oracle.defenses] == ["label-only", "withhold:fraction=1"]
    answer = oracle.query(images(4), Explanation(target="all"))
    assert torch.equal(answer.probabilities.sum(1), torch.ones(4))
    assert set(answer.probabilities.unique().tolist()) == {0.0, 1.0}
    assert not answer.explanation.any()


def test_megex_attack_records_its_defenses(tmp_path, victim, capsys):
    path = str(victim.save(tmp_path / "v.safetensors"))
    out = tmp_path / "run"
    argv = ["attack", "--victim", path, "--out", str(out), "--quiet", "--budget", "500"]
    argv += ["--batch-size", "16", "--defense", "quantize:bits=4", "--defense", "noise:0.3"]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["defenses"] == ["quantize:bits=4", "gaussian:scale=0.3"]
    assert math.isfinite(json.loads((out / "result.json").read_text())["clone_accuracy"])
