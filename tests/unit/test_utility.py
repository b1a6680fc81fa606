"""Explanation utility under defences: the similarity and faithfulness measures, checked by
hand and against SciPy and Quantus, the utility table and `megex utility`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from megex import Explanation
from megex.cli import main
from megex.experiments.utility import (
    METRICS,
    cosine_similarity,
    curve_area,
    explanation_utility,
    perturbation_curve,
    pixel_order,
    quantus_deletion_curve,
    spearman_correlation,
    top_k_overlap,
    utility_table,
)
from megex.stats import mean_interval

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sample_images(digits_test):
    x, _ = digits_test
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:40]]


def gradient_maps(model, x):
    from megex import explain

    return explain(model, x, Explanation("gradient"))


# --- similarity ---------------------------------------------------------------------------


def test_cosine_similarity():
    a = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(cosine_similarity(a, 3 * a), torch.ones(5))
    torch.testing.assert_close(cosine_similarity(a, -a), -torch.ones(5))
    b = a.clone()
    b[2] = 0
    assert cosine_similarity(a, b)[2] == 0  # a zero map tells nothing
    orthogonal = torch.zeros(1, 1, 1, 2)
    assert cosine_similarity(orthogonal + torch.tensor([1.0, 0]), orthogonal + torch.tensor(
        [0.0, 1]
    )) == 0  # fmt: skip


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, 5, 5, generator=generator)
    b = torch.round(a + torch.randn(a.shape, generator=generator))  # many ties
    b[5] = torch.sign(a[5])
    got = spearman_correlation(a, b)
    for i in range(6):
        want = scipy_stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert got[i].item() == pytest.approx(want, abs=1e-6)
    assert spearman_correlation(a[:1], torch.zeros_like(a[:1])).item() == 0


def test_top_k_overlap():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(200, 1, 10, 10, generator=generator)
    assert torch.equal(top_k_overlap(a, a, 0.1), torch.ones(200))
    # The defended map keeps the top 10%: a perfect overlap; their complement: none.
    flat = a.abs().flatten(1)
    top = flat >= flat.topk(10, dim=1).values[:, -1:]
    sparse = (a.flatten(1) * top).view_as(a)
    assert torch.equal(top_k_overlap(a, sparse, 0.1, generator), torch.ones(200))
    rest = (a.flatten(1) * ~top).view_as(a)
    assert torch.equal(top_k_overlap(a, rest, 0.1, generator), torch.zeros(200))
    # A map without an order overlaps by chance: k / size on average.
    chance = top_k_overlap(a, torch.zeros_like(a), 0.1, generator)
    assert abs(chance.mean().item() - 0.1) < 0.02
    with pytest.raises(ValueError, match="top_fraction"):
        top_k_overlap(a, a, 0.0)


# --- faithfulness -------------------------------------------------------------------------


def test_pixel_order_sums_channels_and_breaks_ties_at_random():
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 1, 1], maps[0, 1, 1, 1] = 0.5, -0.4  # pixel 3: 0.9 in all
    maps[0, 1, 0, 1] = -1.0  # pixel 1: 1.0
    maps[0, 0, 0, 0] = 0.2  # pixel 0: 0.2; pixel 2: 0
    assert pixel_order(maps).tolist() == [[1, 3, 0, 2]]
    flat = torch.zeros(1, 1, 1, 50)
    orders = {
        tuple(pixel_order(flat, torch.Generator().manual_seed(s))[0].tolist()) for s in (0, 1)
    }
    assert len(orders) == 2  # ties: a random order, reproducible by its seed
    again = pixel_order(flat, torch.Generator().manual_seed(0))
    assert tuple(again[0].tolist()) in orders


class Linear(nn.Module):
    def __init__(self, c: int, h: int, w: int, k: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(c * h * w, k)

    def forward(self, x):
        return self.layer(x.flatten(1))


def test_deletion_and_insertion_curves_by_hand():
    model = Linear(2, 3, 3).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 3, 3, generator=generator)
    maps = torch.randn(2, 2, 3, 3, generator=generator)
    classes = torch.tensor([0, 2])
    fractions, deletion = perturbation_curve(model, x, maps, classes, steps=4, baseline=0.25)
    _, insertion = perturbation_curve(
        model, x, maps, classes, mode="insertion", steps=4, baseline=0.25
    )
    # 9 pixels, ceil(9 / 4) = 3 a step: 0, 3, 6, 9 pixels changed.
    torch.testing.assert_close(fractions, torch.tensor([0, 1 / 3, 2 / 3, 1]))
    order = pixel_order(maps)
    for i in range(2):
        for j, count in enumerate((0, 3, 6, 9)):
            gone = torch.zeros(9, dtype=torch.bool)
            gone[order[i, :count]] = True
            gone = gone.view(1, 3, 3).expand(2, 3, 3)
            deleted = torch.where(gone, torch.tensor(0.25), x[i])
            inserted = torch.where(gone, x[i], torch.tensor(0.25))
            with torch.no_grad():
                p_del = torch.softmax(model(deleted[None]), 1)[0, classes[i]]
                p_ins = torch.softmax(model(inserted[None]), 1)[0, classes[i]]
            assert deletion[i, j].item() == pytest.approx(p_del.item(), abs=1e-6)
            assert insertion[i, j].item() == pytest.approx(p_ins.item(), abs=1e-6)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(model, x, maps, classes, mode="blur")
    with pytest.raises(ValueError, match="steps"):
        perturbation_curve(model, x, maps, classes, steps=0)


def test_curve_area_is_the_trapezoid_rule():
    fractions = torch.tensor([0.0, 0.25, 1.0])
    curves = torch.tensor([[1.0, 0.75, 0.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(curve_area(fractions, curves), torch.tensor([0.5, 0.5]))


def test_quantus_deletion_agrees_with_the_hand_written_one(digits_victim, sample_images):
    pytest.importorskip("quantus")
    x = sample_images[:12]
    maps = gradient_maps(digits_victim, x)
    classes = digits_victim.predict(x)
    fractions, ours = perturbation_curve(digits_victim, x, maps, classes, steps=16)
    theirs = quantus_deletion_curve(digits_victim, x, maps, classes, steps=16)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert ours[:, 0].min() > 0.5 and ours[:, -1].max() < ours[:, 0].min()
    # Several channels: Quantus removes whole pixels as the hand-written curve does.
    model = Linear(3, 6, 6, k=4).eval()
    x3 = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    maps3 = gradient_maps(model, x3)
    classes3 = model(x3).argmax(1)
    _, ours3 = perturbation_curve(model, x3, maps3, classes3, steps=12, baseline=0.5)
    theirs3 = quantus_deletion_curve(model, x3, maps3, classes3, steps=12, baseline=0.5)
    torch.testing.assert_close(theirs3, ours3, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="must divide"):
        quantus_deletion_curve(model, x3, maps3, classes3, steps=5)


# --- the utility table --------------------------------------------------------------------


def test_explanation_utility_rows(digits_victim, sample_images):
    rows = [
        "gaussian:0",
        "gaussian:0.2",
        "gaussian:2",
        ["quantize:bits=3", "withhold:1"],
        "reverse-sigmoid:beta=0.5,gamma=0.2",
    ]
    result = explanation_utility(digits_victim, sample_images[:24], rows, steps=8, seed=1)
    assert json.loads(json.dumps(result)) == result
    assert result["images"] == 24 and result["top_k"] == round(0.1 * 64)
    table = {row["defense"]: row for row in result["rows"]}
    assert list(table) == [
        "none",
        "gaussian:scale=0",
        "gaussian:scale=0.2",
        "gaussian:scale=2",
        "quantize:bits=3 + withhold:fraction=1",
        "reverse-sigmoid:beta=0.5,gamma=0.2,keep_label=true",
    ]
    none = table["none"]
    for name in ("cosine", "spearman", "top_k_overlap", "label_kept"):
        assert none[name] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert none["probability_l1"]["mean"] == 0
    for row in result["rows"]:
        for name in METRICS:
            assert row[name]["low"] <= row[name]["mean"] <= row[name]["high"], (row, name)
    assert table["gaussian:scale=0"]["deletion_auc"] == none["deletion_auc"]
    weak, strong = table["gaussian:scale=0.2"], table["gaussian:scale=2"]
    assert 1 > weak["cosine"]["mean"] > strong["cosine"]["mean"]
    assert weak["cosine"]["low"] > strong["cosine"]["high"]
    withheld = table["quantize:bits=3 + withhold:fraction=1"]
    assert withheld["cosine"]["mean"] == 0 and withheld["spearman"]["mean"] == 0
    # A faithful map deletes the class faster and inserts it faster than no map (random order).
    assert none["deletion_auc"]["mean"] < withheld["deletion_auc"]["mean"]
    assert none["insertion_auc"]["mean"] > withheld["insertion_auc"]["mean"]
    rs = table["reverse-sigmoid:beta=0.5,gamma=0.2,keep_label=true"]
    assert rs["cosine"]["mean"] == 1 and rs["probability_l1"]["low"] > 0
    assert rs["label_kept"]["mean"] == 1
    text = utility_table(result)
    assert text.splitlines()[0].startswith("| defence | cosine ↑ |") and len(text.splitlines()) == 8


def test_utility_of_maps_of_every_class(digits_victim, sample_images):
    result = explanation_utility(
        digits_victim,
        sample_images[:10],
        ["predicted-only"],
        Explanation(target="all"),
        steps=8,
    )
    none, predicted = result["rows"]
    # One class of ten kept: similarity is averaged over the classes' maps...
    assert predicted["cosine"]["mean"] == pytest.approx(0.1)
    # ...and faithfulness is the predicted class's map's, which is untouched.
    assert predicted["deletion_auc"] == none["deletion_auc"]


def test_utility_with_quantus_computes_the_same_deletion(digits_victim, sample_images):
    pytest.importorskip("quantus")
    rows = ["gaussian:0.5", "withhold:1"]
    kwargs = {"steps": 16, "seed": 3}
    ours = explanation_utility(digits_victim, sample_images[:16], rows, **kwargs)
    theirs = explanation_utility(
        digits_victim, sample_images[:16], rows, faithfulness="quantus", **kwargs
    )
    assert theirs["faithfulness"] == "quantus"
    for a, b in zip(ours["rows"], theirs["rows"]):
        assert a["deletion_auc"]["mean"] == pytest.approx(b["deletion_auc"]["mean"], abs=1e-5)
        assert a["insertion_auc"] == b["insertion_auc"]


def test_utility_refuses_bad_settings(digits_victim, sample_images):
    x = sample_images[:4]
    with pytest.raises(ValueError, match="faithfulness"):
        explanation_utility(digits_victim, x, [], faithfulness="captum")
    with pytest.raises(ValueError, match="defense 'smooth': applies to gradient"):
        explanation_utility(digits_victim, x, ["smooth"], Explanation("integrated_gradients"))
    with pytest.raises(ValueError, match="defense: unknown 'blur'"):
        explanation_utility(digits_victim, x, ["blur"])
    with pytest.raises(ValueError, match=r"images: shape \(4, 1, 8, 7\) does not match"):
        explanation_utility(digits_victim, x[..., :7], [])


def test_mean_interval():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)).tolist()
    mean, low, high = mean_interval(values)
    assert mean == pytest.approx(sum(values) / len(values))
    half = 1.96 * torch.tensor(values).std().item() / math.sqrt(len(values))
    assert high - low == pytest.approx(2 * half, rel=0.15) and low < mean < high
    assert mean_interval(values, seed=1) != (mean, low, high)
    single = mean_interval([0.5])
    assert single[0] == 0.5 and math.isnan(single[1]) and math.isnan(single[2])
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


# --- megex utility ------------------------------------------------------------------------


def test_megex_utility(tmp_path, digits_victim, capsys):
    path = str(digits_victim.save(tmp_path / "v.safetensors"))
    argv = ["utility", "--victim", path, "--images", "12", "--steps", "8"]
    argv += ["--defense", "quantize:bits=2", "--defense", "noise:1e+0 + sign"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["images"] == 12
    assert [r["defense"] for r in result["rows"]] == [
        "none",
        "quantize:bits=2",
        "gaussian:scale=1 + sign",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| quantize:bits=2 |" in text and "on 12 digits test images" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--defense", "blur"], "--defense: defense: unknown 'blur'"),
        (["--defense", "+ round:2"], "--defense: defense: empty spec"),
        (["--defense", "smooth", "--explanation-method", "integrated_gradients"],
         "defense 'smooth': applies to gradient and smoothgrad explanations"),
        (["--dataset", "fashion-mnist"], "--dataset: fashion-mnist images are"),
    ],
)  # fmt: skip
def test_megex_utility_mistakes_are_one_line(tmp_path, digits_victim, request, capsys, extra,
                                              message):  # fmt: skip
    if "fashion-mnist" in extra:
        request.getfixturevalue("fashion_mnist")  # skipped where it is not installed
    path = str(digits_victim.save(tmp_path / "v.safetensors"))
    assert main(["utility", "--victim", path, "--images", "4", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
