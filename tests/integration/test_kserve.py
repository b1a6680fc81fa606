"""A megex victim in KServe's own ModelServer (megex.integrations.kserve), started as a
process on a loopback port: the attack runs against it unchanged and counts exactly the
images the server answered, and the defences applied inside it give megex's own numbers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch

from megex import Explanation, LocalOracle, Victim
from megex.cli import main
from megex.defenses import build_defense

httpx = pytest.importorskip("httpx", reason="the server extra is not installed")

from integrations_support import answered, kserve_server, require_kserve  # noqa: E402
from server_support import images, save_tiny_victim  # noqa: E402

require_kserve()  # CI (MEGEX_REQUIRE_SERVERS=1): a missing KServe is a failure

from megex.client import RemoteOracle, RemoteV1Oracle, connect, detect_protocol  # noqa: E402

DEFENSES = ["round:2", "quantize:bits=2", "gaussian:scale=0.1"]
SEED = 7


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    # As the server computes: the same kernels give the same bits near a quantisation step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_the_attack_counts_exactly_what_kserve_answered(tmp_path, capsys):
    with kserve_server(tmp_path) as (url, log):
        # Another client first: this run must count only its own queries.
        first = httpx.post(
            url.replace("/v2/", "/v1/") + ":predict", json={"instances": images(5).tolist()}
        )
        assert first.status_code == 200 and first.headers["x-queries-used"] == "5"
        out = tmp_path / "run"
        argv = ["attack", "--method", "megex", "--victim", url, "--budget", "2000"]
        assert main(argv + ["--dataset", "digits", "--quiet", "--out", str(out)]) == 0
        summed, total = answered(log)
        metadata = httpx.get(url)
    result = json.loads((out / "result.json").read_text())
    assert summed == total and int(metadata.headers["x-queries-used"]) == total
    assert result["queries_used"] == total - 5
    assert 0 < result["queries_used"] <= 2000 and result["finished"]
    printed = capsys.readouterr().out
    assert "reports no query budget: --budget 2000 is enforced by this client" in printed


def test_defences_inside_kserve_give_megex_numbers(tmp_path):
    options = [f"--defense={spec}" for spec in DEFENSES] + ["--seed", str(SEED)]
    # The monitors see the honest probabilities and must not change an answer.
    options += ["--monitor", "prada", "--max-passes-per-request", "1000"]
    x = images(12, seed=3)
    smoothgrad = Explanation("smoothgrad", target="all", samples=4, sigma=0.2)
    with kserve_server(tmp_path, *options) as (url, log), one_thread():
        victim = Victim.load(tmp_path / "v.safetensors")
        defenses = [build_defense(spec) for spec in DEFENSES]
        local = LocalOracle(victim, defenses=defenses, seed=SEED)
        honest = LocalOracle(victim, seed=SEED)
        v1 = url.replace("/v2/", "/v1/")
        with RemoteOracle(url, protocol="json") as json_client:
            served = json_client.query(x[:4], True)
        expected = local.query(x[:4], True)
        with RemoteOracle(url, protocol="binary") as binary_client:
            served_all = binary_client.query(x, smoothgrad)
        expected_all = local.query(x, smoothgrad)
        predicted = httpx.post(f"{v1}:predict", json={"instances": x[:3].tolist()}).json()
        expected_predicted = local.query(x[:3])
        explained = httpx.post(f"{v1}:explain", json={"instances": x[:3].tolist()}).json()
        expected_explained = local.query(x[:3], True)
        refused = httpx.post(f"{v1}:predict", json={"instances": [[0.5, 0.5]]})
        unknown = httpx.post(f"{url}/infer", json={**_v2_body(x[:1]), "parameters": {"a": 1}})
        costly = {"method": "integrated_gradients", "steps": 256}  # 12 x 513 passes > 1000
        too_costly = httpx.post(
            f"{url}/infer",
            json={**_v2_body(x), "parameters": costly, "outputs": [{"name": "explanation"}]},
        )
        _, total = answered(log)

    close = dict(atol=1e-6, rtol=0)
    assert served.explanation_spec == Explanation("gradient")
    assert torch.allclose(served.probabilities, expected.probabilities, **close)
    assert torch.equal(served.labels, expected.labels)
    assert torch.allclose(served.explanation, expected.explanation, **close)
    assert served_all.explanation_spec == smoothgrad
    assert served_all.explanation.shape == (12, 10, *x.shape[1:])
    assert torch.allclose(served_all.explanation, expected_all.explanation, **close)
    assert torch.allclose(served_all.probabilities, expected_all.probabilities, **close)
    # The defences did act: the honest maps and probabilities differ.
    unguarded = honest.query(x[:4], True)
    assert not torch.allclose(served.explanation, unguarded.explanation, **close)
    assert not torch.allclose(served.probabilities, unguarded.probabilities, **close)

    assert torch.allclose(
        torch.tensor(predicted["predictions"]), expected_predicted.probabilities, **close
    )
    maps = [
        e["attributions"][0]["featureAttributions"]["images"] for e in explained["explanations"]
    ]
    assert torch.allclose(torch.tensor(maps), expected_explained.explanation, **close)
    assert torch.allclose(
        torch.tensor(explained["predictions"]), expected_explained.probabilities, **close
    )
    # megex's refusals, with megex's status and code; refused requests are not counted.
    assert refused.status_code == 400 and refused.json()["code"] == "invalid_images"
    assert unknown.status_code == 400 and "unknown 'a'" in unknown.json()["error"]
    assert too_costly.status_code == 400 and too_costly.json()["code"] == "compute_limit"
    assert total == 4 + 12 + 3 + 3


def test_the_v1_client_against_kserve_gives_megex_numbers(tmp_path, capsys):
    """KServe V1 (:predict, :explain) read by RemoteV1Oracle equals the V2 client (binary
    tensors, which KServe accepts without listing the extension) and LocalOracle, counts
    equal the server's, and megex attack runs over V1."""
    x = images(6, seed=5)
    specs = [
        None,
        True,
        Explanation("gradient", target="all", output="logit"),
        Explanation("smoothgrad", target=3, samples=3, sigma=0.2),
    ]
    with kserve_server(tmp_path, "--seed", str(SEED)) as (url, log), one_thread():
        root, v1_url = url.split("/v2/")[0], url.replace("/v2/", "/v1/")
        local = LocalOracle(Victim.load(tmp_path / "v.safetensors"), seed=SEED)
        assert detect_protocol(root) == "v2" and detect_protocol(v1_url) == "v1"
        # Each client's answers first, then the same requests in the same order locally:
        # SmoothGrad's noise comes from the server's one generator.
        with connect(v1_url, input_shape=x.shape[1:]) as v1:
            assert isinstance(v1, RemoteV1Oracle) and v1.queries_used == 0
            over_v1 = [v1.query(x, spec) for spec in specs]
            assert v1.queries_used == answered(log)[1] == len(specs) * len(x)
        with connect(root, encoding="binary") as v2:
            assert isinstance(v2, RemoteOracle) and v2.encoding == "binary"
            over_v2 = [v2.query(x, spec) for spec in specs]
            assert v2.queries_used == answered(log)[1] == 2 * len(specs) * len(x)
        expected = [local.query(x, spec) for spec in specs + specs]
        before = answered(log)[1]
        out = tmp_path / "run"
        argv = ["attack", "--victim", v1_url, "--protocol", "v1", "--dataset", "digits"]
        argv += ["--budget", "400", "--batch-size", "32", "--quiet", "--out", str(out)]
        assert main(argv) == 0
        summed, total = answered(log)
    for got, want in zip(over_v1 + over_v2, expected):
        assert torch.allclose(got.probabilities, want.probabilities, atol=1e-6, rtol=0)
        assert torch.equal(got.labels, want.labels)
        assert got.explanation_spec == want.explanation_spec
        if want.explanation is None:
            assert got.explanation is None
        else:
            assert torch.allclose(got.explanation, want.explanation, atol=1e-6, rtol=0)
    result = json.loads((out / "result.json").read_text())
    assert summed == total and result["queries_used"] == total - before
    assert result["finished"] and 0 < result["queries_used"] <= 400
    assert "--budget 400 is enforced by this client" in capsys.readouterr().out


def _v2_body(x: torch.Tensor) -> dict:
    return {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.flatten().tolist(),
            }
        ]
    }


def test_kserve_serves_the_explainer_a_provider_ships(tmp_path):
    """--explainer captum:InputXGradient inside KServe: its maps are captum's, labelled with
    megex's equivalent, as megex serve's and LocalOracle's with the same explainer."""
    pytest.importorskip("captum", reason="captum is not installed")
    from megex.integrations.explainers import build_explainer

    x = images(4, seed=6)
    spec = "captum:InputXGradient"
    with kserve_server(tmp_path, "--explainer", spec) as (url, _), one_thread():
        with RemoteOracle(url) as remote:
            served = remote.query(x, True)
        local = LocalOracle(
            Victim.load(tmp_path / "v.safetensors"),
            explanation=Explanation("input_x_gradient"),
            explainer=build_explainer(spec),
        )
        expected = local.query(x, True)
    assert served.explanation_spec.method == "input_x_gradient"
    torch.testing.assert_close(served.explanation, expected.explanation)
    assert not torch.allclose(served.explanation, torch.zeros_like(served.explanation))


def test_a_bad_explainer_stops_kserve_with_one_line(tmp_path, capsys):
    from megex.integrations.kserve import main as kserve_main

    victim = save_tiny_victim(tmp_path)
    with pytest.raises(SystemExit) as stop:
        kserve_main(["--victim", str(victim), "--explainer", "captum:Nope"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--explainer: captum:Nope" in err
