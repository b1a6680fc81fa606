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
from pathlib import Path

import pytest
import torch
from integrations_support import (
    free_port,
    mlserver_count,
    mlserver_settings,
    require_mlserver,
    server_process,
)
from server_support import images, save_tiny_victim

from megex import Explanation, LocalOracle, Victim
from megex.cli import main
from megex.client import RemoteOracle
from megex.defenses import build_defense

DEFENSES = ["quantize:bits=2", "round:2"]
SEED = 7
# The attack at its smallest: the point is the query count, not the clone.
BUDGET = 2000


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
    mlserver = require_mlserver()
    root = tmp_path_factory.mktemp("mlserver")
    http_port = free_port()
    (root / "settings.json").write_text(json.dumps(mlserver_settings(http_port)))
    _write_model(root / "plain", "plain", {"seed": 0})
    _write_model(root / "defended", "defended", {"defenses": DEFENSES, "seed": SEED})
    url = f"http://127.0.0.1:{http_port}"
    ready = f"{url}/v2/models/defended/ready"
    with server_process([mlserver, "start", str(root)], ready, root / "log.txt", cwd=root):
        yield url


def test_attack_runs_against_mlserver_and_its_count_is_the_runs(server, tmp_path):
    model = f"{server}/v2/models/plain"
    assert mlserver_count(model) == 0
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
    assert mlserver_count(model) == 5 + spent


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
