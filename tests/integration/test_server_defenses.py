"""Defences over HTTP: `megex serve --defense` answers as the in-process oracle with the same
defences and seed, and a smoothing defence's compute is counted and its limits kept."""

from __future__ import annotations

import json
import select
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
from server_support import ServerThread, images, save_tiny_victim, tiny_victim  # noqa: E402

from megex import Explanation, LocalOracle, Victim  # noqa: E402
from megex.client import RemoteOracle  # noqa: E402
from megex.defenses import build_defenses  # noqa: E402
from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

KEY = "defended-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_megex_serve_applies_its_defenses(tmp_path):
    path = save_tiny_victim(tmp_path)
    specs = ["reverse-sigmoid:beta=0.5,gamma=0.2", "quantize:bits=3", "noise:0.3", "withhold:0.5"]
    argv = ["serve", "--victim", str(path), "--port", "0", "--key", KEY, "--seed", "4"]
    argv += ["--db", str(tmp_path / "l.sqlite"), "--log-level", "warning"]
    for spec in specs:
        argv += ["--defense", spec]
    proc = subprocess.Popen(
        [sys.executable, "-m", "megex", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "no ready line within 60 s"
        ready = json.loads(proc.stdout.readline())
        remote = RemoteOracle(ready["url"], api_key=KEY)
        x = images(6, seed=5)
        first = remote.query(x, explanation=True)
        second = remote.query(x, explanation=True)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "defences: reverse-sigmoid:beta=0.5,gamma=0.2,keep_label=true, quantize:bits=3" in err
    local = LocalOracle(Victim.load(path), defenses=build_defenses(specs), seed=4)
    for got in (first, second):  # the second request continues the same noise stream
        want = local.query(x, explanation=True)
        torch.testing.assert_close(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.explanation, want.explanation, rtol=1e-5, atol=1e-7)
        assert torch.equal(got.labels, want.labels)
    plain = LocalOracle(Victim.load(path)).query(x, explanation=True)
    assert not torch.allclose(first.probabilities, plain.probabilities)
    assert not torch.allclose(first.explanation, plain.explanation)
    assert not torch.equal(first.explanation, second.explanation)


def infer(url: str, n: int, parameters: dict) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "images",
                "shape": [n, 1, 8, 8],
                "datatype": "FP32",
                "data": images(n, seed=1).reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "explanation"}, {"name": "probabilities"}],
        "parameters": parameters,
    }
    return httpx.post(f"{url}/v2/models/model/infer", json=body, headers=AUTH, timeout=30)


def test_a_smoothing_defense_is_computed_counted_and_limited():
    victim = tiny_victim()
    app = create_app(
        victim,
        keys=[KEY],
        defenses=build_defenses(["smooth:sigma=0.2,samples=4"]),
        max_passes_per_request=40,
        seed=2,
    )
    with ServerThread(app) as s:
        r = infer(s.url, 2, Explanation("gradient").to_dict())
        assert r.status_code == 200, r.text
        # SmoothGrad's compute: 1 forward + 4 samples x (1 forward + 1 backward) per image.
        assert r.headers["X-Model-Passes"] == str(2 * (1 + 4 * 2))
        out = {o["name"]: o for o in r.json()["outputs"]}
        got = torch.tensor(out["explanation"]["data"]).reshape(2, 1, 8, 8)
        computed = Explanation("smoothgrad", sigma=0.2, samples=4)
        want = LocalOracle(victim, explanation=computed, seed=2).query(images(2, seed=1), True)
        torch.testing.assert_close(got, want.explanation, rtol=1e-5, atol=1e-7)
        # The answer names the explanation that was asked for.
        assert Explanation.from_dict(out["explanation"]["parameters"]) == Explanation("gradient")
        # Five images cost 45 passes with the defence (15 without): over the limit of 40.
        r = infer(s.url, 5, Explanation("gradient").to_dict())
        assert r.status_code == 400 and r.json()["code"] == "compute_limit"
        # Methods it cannot smooth are not offered, and cost nothing.
        used = app.state.ledger.total_used()
        r = infer(s.url, 1, Explanation("integrated_gradients", steps=2).to_dict())
        assert r.status_code == 403 and r.json()["code"] == "explanation_not_offered"
        assert "defense 'smooth'" in r.json()["error"]
        assert app.state.ledger.total_used() == used
