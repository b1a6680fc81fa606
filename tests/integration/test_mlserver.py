"""megex against a real MLServer (``mlserver start``) serving megex.integrations.mlserver.

One server, on free loopback ports, serves two models: ``plain`` (no defences), attacked end
to end by ``megex attack --victim URL``, and ``defended`` (quantize:bits=2 then round:2, seed
7), whose answers are compared with megex's own LocalOracle set the same way. The server-side
count is the runtime's ledger, read from the model metadata's ``queries_used``.

MLServer runs from the environment it was installed in: ``mlserver`` on PATH, else
.venv-mlserver/bin/mlserver (`make test` makes it: MLServer pins older FastAPI and
Starlette than megex's server needs), with PYTHONPATH=src. Skipped when neither exists,
unless MEGEX_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from server_support import images, save_tiny_victim

from megex import Explanation, LocalOracle, Victim
from megex.cli import main
from megex.client import RemoteOracle
from megex.defenses import build_defense

ROOT = Path(__file__).resolve().parents[2]
DEFENSES = ["quantize:bits=2", "round:2"]
SEED = 7
# The attack at its smallest: the point is the query count, not the clone.
BUDGET = 2000


def _mlserver() -> str | None:
    found = shutil.which("mlserver", path=str(Path(sys.executable).parent))
    local = ROOT / ".venv-mlserver" / "bin" / "mlserver"
    return found or (str(local) if local.is_file() else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_model(folder: Path, name: str, extra: dict) -> None:
    folder.mkdir()
    save_tiny_victim(folder)
    settings = {
        "name": name,
        "implementation": "megex.integrations.mlserver.MegexRuntime",
        "parameters": {"uri": "./v.safetensors", "extra": extra},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The root URL of a running MLServer with models 'plain' and 'defended'."""
    mlserver = _mlserver()
    if mlserver is None:
        if os.environ.get("MEGEX_REQUIRE_SERVERS") == "1":
            pytest.fail("MLServer is not installed (make test installs it in .venv-mlserver)")
        pytest.skip("MLServer is not installed (pip install 'megex[mlserver]')")
    root = tmp_path_factory.mktemp("mlserver")
    http_port = _free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": _free_port(),
        "metrics_port": _free_port(),
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    _write_model(root / "plain", "plain", {"seed": 0})
    _write_model(root / "defended", "defended", {"defenses": DEFENSES, "seed": SEED})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    log = (root / "log.txt").open("w")
    process = subprocess.Popen(
        [mlserver, "start", str(root)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/models/defended/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not start: {(root / 'log.txt').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _served_count(url: str) -> int:
    return httpx.get(url).json()["parameters"]["queries_used"]


def test_attack_runs_against_mlserver_and_its_count_is_the_runs(server, tmp_path):
    model = f"{server}/v2/models/plain"
    assert _served_count(model) == 0
    # Another client's queries first: the attack's budget is its own queries, not the
    # server's count (read from the metadata before its first query).
    with RemoteOracle(model) as other:
        other.query(images(5, seed=1))
    out = tmp_path / "run"
    argv = ["attack", "--method", "megex", "--victim", model, "--budget", str(BUDGET)]
    argv += ["--dataset", "digits", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    spent = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["queries"]
    assert BUDGET // 2 < spent <= BUDGET
    assert _served_count(model) == 5 + spent


def test_defences_in_mlserver_answer_as_megex_oracle(server, tmp_path):
    victim = Victim.load(save_tiny_victim(tmp_path))
    defended = [build_defense(spec) for spec in DEFENSES]
    local = LocalOracle(victim, defenses=defended, seed=SEED)
    undefended = LocalOracle(victim, seed=SEED)
    x = images(6, seed=3)
    # SmoothGrad draws its noise from the service's generator: the seed must agree too.
    asked = [Explanation("gradient"), Explanation("smoothgrad", samples=4), None]
    with RemoteOracle(f"{server}/v2/models/defended") as remote:
        for explanation in asked:
            got, expected = remote.query(x, explanation), local.query(x, explanation)
            honest = undefended.query(x, explanation)
            torch.testing.assert_close(got.probabilities, expected.probabilities)
            torch.testing.assert_close(got.labels, expected.labels)
            assert not torch.equal(got.probabilities, honest.probabilities)
            if explanation is None:
                assert got.explanation is None
                continue
            assert got.explanation_spec == explanation
            torch.testing.assert_close(got.explanation, expected.explanation)
            assert not torch.equal(got.explanation, honest.explanation)
        assert remote.queries_used == local.queries_used == 18
