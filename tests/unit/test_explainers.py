"""Maps from outside megex (megex.integrations.explainers): a service whose explanations come
from captum or from a user's function returns exactly those maps; a bad spec is one line."""

from __future__ import annotations

import sys

import pytest
import torch
from server_support import images, save_tiny_victim, tiny_victim

from megex import Explanation, LocalOracle
from megex.cli import main
from megex.defenses import build_defense
from megex.integrations.explainers import build_explainer
from megex.oracle import ExplanationNotOffered

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def probabilities_of(victim):
    return lambda x: torch.softmax(victim(x), dim=1)


def test_integrated_gradients_from_captum_are_captums_maps():
    victim, x = tiny_victim(), images(5, seed=1)
    ig = Explanation("integrated_gradients", steps=8, baseline=0.25)
    oracle = LocalOracle(
        victim, explanation=ig, explainer=build_explainer("captum:IntegratedGradients")
    )
    answer = oracle.query(x, True)
    method = captum_attr.IntegratedGradients(probabilities_of(victim))
    predicted = victim(x).argmax(dim=1)
    expected = method.attribute(x.clone(), target=predicted, n_steps=8, baselines=0.25)
    torch.testing.assert_close(answer.explanation, expected, rtol=0, atol=0)
    assert answer.explanation_spec == ig and oracle.queries_used == 5
    # captum's default rule (Gauss-Legendre), not megex's midpoint rule: other maps.
    assert not torch.allclose(answer.explanation, LocalOracle(victim).query(x, ig).explanation)

    # A request may choose target and output, but not another method.
    every = oracle.query(x, Explanation("integrated_gradients", steps=8, target="all"))
    assert every.explanation.shape == (5, 10, 1, 8, 8)
    torch.testing.assert_close(
        every.explanation[:, 3],
        method.attribute(x.clone(), target=3, n_steps=8, baselines=0.0),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ExplanationNotOffered, match="its own explainer"):
        oracle.query(x, Explanation("gradient"))


def test_captum_methods_label_their_maps_and_follow_the_seed():
    assert build_explainer("captum:Saliency").method == "gradient"
    assert build_explainer("captum:InputXGradient").method == "input_x_gradient"
    assert build_explainer("captum:GuidedBackprop").method is None
    victim, x = tiny_victim(), images(3, seed=2)
    saliency = LocalOracle(victim, explainer=build_explainer("captum:Saliency:abs=false"))
    expected = captum_attr.Saliency(probabilities_of(victim)).attribute(
        x.clone(), target=victim(x).argmax(dim=1), abs=False
    )
    torch.testing.assert_close(saliency.query(x, True).explanation, expected, rtol=0, atol=0)
    smooth = Explanation("smoothgrad", samples=4, sigma=0.2)

    def tunnel(seed):
        explainer = build_explainer("captum:NoiseTunnel(Saliency)")
        return LocalOracle(victim, explanation=smooth, explainer=explainer, seed=seed)

    first, again, other = (tunnel(s).query(x, True).explanation for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_function_is_used_as_given(tmp_path, monkeypatch):
    (tmp_path / "shipped_explainer.py").write_text(
        "import torch\n"
        "calls = []\n"
        "def explain(model, images, targets):\n"
        "    calls.append(model(images).sum(dim=1))\n"
        "    return images * 0 + targets.view(-1, 1, 1, 1).float()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    victim, x = tiny_victim(), images(4, seed=3)
    explainer = build_explainer("shipped_explainer:explain")
    oracle = LocalOracle(victim, explanation=Explanation("gradient", target=7), explainer=explainer)
    maps = oracle.query(x, True).explanation
    assert torch.equal(maps, torch.full_like(x, 7.0))
    (probability_sums,) = sys.modules["shipped_explainer"].calls
    torch.testing.assert_close(probability_sums, torch.ones(4))  # the model gives probabilities


def test_a_defence_that_changes_the_computed_explanation_is_refused():
    with pytest.raises(ValueError, match="does not apply to an explainer"):
        LocalOracle(
            tiny_victim(),
            explainer=build_explainer("captum:Saliency"),
            defenses=[build_defense("smooth")],
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("IntegratedGradients", "expected captum:NAME"),
        ("captum:Integrated", "'Integrated' is not a captum.attr attribution method"),
        ("captum:LayerGradCam", "LayerGradCam needs more than the model"),
        ("captum:Saliency:abs", "expected key=value"),
        ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ],
)
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(ValueError) as info:
        build_explainer(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_without_captum_the_spec_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    with pytest.raises(ValueError, match="captum is not installed"):
        build_explainer("captum:Saliency")


def test_serve_explainer_flag_serves_captums_maps(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from megex.cli import build_parser
    from megex.cli.serve import build_app

    path = save_tiny_victim(tmp_path)
    db = str(tmp_path / "ledger.sqlite")
    assert main(["serve", "--victim", str(path), "--db", db, "--explainer", "captum:Nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--explainer: captum:Nope: 'Nope' is not a captum.attr" in err and "\n" not in err

    argv = ["serve", "--victim", str(path), "--db", db, "--explainer", "captum:Saliency"]
    app, _ = build_app(build_parser().parse_args(argv))
    x = images(2, seed=4)
    body = {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                    "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "explanation"}],
    }  # fmt: skip
    with TestClient(app) as client:
        response = client.post("/v2/models/model/infer", json=body)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["parameters"]["method"] == "gradient"
    victim = app.state.service.responder.victim
    expected = captum_attr.Saliency(probabilities_of(victim)).attribute(
        x.clone(), target=victim(x).argmax(dim=1)
    )
    served = torch.tensor(out["data"]).view(2, 1, 8, 8)
    torch.testing.assert_close(served, expected)
