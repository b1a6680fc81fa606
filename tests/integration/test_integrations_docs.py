"""The serving recipes of docs/integrations.md run as written: KServe started with the page's
command and attacked with each of its `megex attack` lines (V2 and V1), MLServer started with
the page's settings files and attacked with its line. Each run must finish and count exactly
the queries the server says it answered for that run.

What cannot be as written on a test machine is changed, and only that: the documented port
8080 becomes a free loopback port (HOST: 127.0.0.1), `megex attack` gets --quiet (as the
docs' other commands do in tests/e2e/test_docs.py), and `python` is this interpreter. The
victim, victims/digits.safetensors, is made by the README's `megex train-victim` line, with
fewer epochs.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from docs_support import QUIET, README, ROOT, blocks, megex_lines
from integrations_support import (
    answered,
    free_port,
    mlserver_count,
    require_kserve,
    require_mlserver,
    server_process,
)

from megex.cli import main
from megex.client import RemoteOracle

PAGE = ROOT / "docs" / "integrations.md"
# The port every command of the page uses; HOST is the server's address.
DOCUMENTED_PORT = "8080"
DOCUMENTED_ADDRESS = f"HOST:{DOCUMENTED_PORT}"
# The README's recipe trains 40 epochs (over 10 s on 2 cores); the serving recipes need a
# real digits victim, not an accurate one, so it trains 2 epochs (the clone and the counts
# do not depend on it).
VICTIM_EPOCHS = "2"


def section_blocks(language: str, heading: str) -> list[str]:
    """The page's `language` blocks under its `## heading` (its subsections included)."""
    text = PAGE.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end
    return [block for block in blocks(language, PAGE) if start < text.index(block) < end]


def attack_lines(heading: str) -> list[str]:
    lines = [
        line.strip() for block in section_blocks("console", heading) for line in block.splitlines()
    ]
    return [line for line in lines if line.startswith("megex attack ")]


# The documented budget (10,000) takes about 25 s a recipe on 2 cores; the counts checked do
# not depend on it, so the suite runs the recipes at this budget instead.
TEST_BUDGET = "2000"


def served_here(line: str, port: int) -> list[str]:
    """A documented `megex attack` line's arguments (after `megex`) against the server on
    `port`: HOST:8080 becomes 127.0.0.1:port, the budget TEST_BUDGET, and --quiet is added
    (no progress bars)."""
    assert DOCUMENTED_ADDRESS in line, f"{line!r} does not attack {DOCUMENTED_ADDRESS}"
    args = shlex.split(line.replace(DOCUMENTED_ADDRESS, f"127.0.0.1:{port}"))[1:]
    assert args[0] in QUIET
    args[args.index("--budget") + 1] = TEST_BUDGET
    return [*args, "--quiet"]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def run_attack(args: list[str], folder: Path) -> dict:
    """`megex attack ARGS` in `folder` (relative paths as written): its result.json."""
    with contextlib.chdir(folder):
        assert main(args) == 0, args
    result = json.loads((folder / option(args, "--out") / "result.json").read_text())
    assert result["finished"]
    assert 0 < result["queries_used"] <= int(option(args, "--budget"))
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A provider's working folder holding victims/digits.safetensors, made by the README's
    `megex train-victim` line (with fewer epochs and --quiet)."""
    folder = tmp_path_factory.mktemp("provider")
    (line,) = [
        line
        for line in megex_lines([README])
        if "victims/digits.safetensors" in line and line.split()[1] == "train-victim"
    ]
    with contextlib.chdir(folder):
        assert main([*shlex.split(line)[1:], "--epochs", VICTIM_EPOCHS, "--quiet"]) == 0
    assert (folder / "victims" / "digits.json").is_file()
    return folder


# -- KServe ---------------------------------------------------------------------------------


def kserve_command() -> list[str]:
    (line,) = [
        line.strip()
        for block in section_blocks("bash", "KServe")
        for line in block.splitlines()
        if "megex.integrations.kserve" in line
    ]
    return shlex.split(line)


@pytest.fixture(scope="module")
def kserve(workdir) -> Iterator[tuple[int, Path]]:
    """The page's KServe command, running in the working folder: (its port, its log)."""
    require_kserve()
    argv = kserve_command()
    assert argv[:3] == ["python", "-m", "megex.integrations.kserve"], argv
    assert option(argv, "--http-port") == DOCUMENTED_PORT
    port = free_port()
    argv[0] = sys.executable  # the interpreter running the tests, with KServe installed
    argv[argv.index("--http-port") + 1] = str(port)
    log = workdir / "kserve.log"
    ready = f"http://127.0.0.1:{port}/v2/health/ready"
    with server_process(argv, ready, log, cwd=workdir):
        yield port, log


@pytest.mark.parametrize("line", attack_lines("KServe"), ids=lambda line: line.split()[-1])
def test_kserve_recipe_runs_as_written(line, kserve, workdir, capsys):
    port, log = kserve
    args = served_here(line, port)
    model = re.sub(r"/v[12]/", "/v2/", option(args, "--victim"))
    before = answered(log)[1]
    result = run_attack(args, workdir)
    summed, total = answered(log)
    # The log's request lines add up to its running count, and the run counted exactly the
    # images the server answered while it ran (its metadata's header says the same).
    assert summed == total and result["queries_used"] == total - before
    assert int(httpx.get(model).headers["x-queries-used"]) == total
    budget = option(args, "--budget")
    assert f"--budget {budget} is enforced by this client" in capsys.readouterr().out


def test_kserve_section_documents_v2_and_v1_attacks():
    urls = [option(shlex.split(line), "--victim") for line in attack_lines("KServe")]
    assert any("/v2/models/" in url for url in urls) and any("/v1/models/" in url for url in urls)


# -- MLServer -------------------------------------------------------------------------------


def mlserver_files() -> tuple[str, dict]:
    """The page's model-settings.json (its text) and settings.json."""
    found = section_blocks("json", "MLServer")
    (model,) = [block for block in found if "implementation" in json.loads(block)]
    (server,) = [json.loads(block) for block in found if "parallel_workers" in json.loads(block)]
    return model, server


def test_mlserver_recipe_runs_as_written(workdir):
    mlserver = require_mlserver()
    model_settings_text, settings = mlserver_files()
    model_settings = json.loads(model_settings_text)
    (line,) = attack_lines("MLServer")
    (start,) = [
        line.strip()
        for block in section_blocks("console", "MLServer")
        for line in block.splitlines()
        if line.strip().startswith("mlserver ")
    ]
    models = workdir / shlex.split(start)[-1]
    name = model_settings["name"]
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "model-settings.json").write_text(model_settings_text)
    # The victim's files where parameters.uri says (copied, as a provider would).
    victim = workdir / "victims" / "digits.safetensors"
    served = folder / model_settings["parameters"]["uri"]
    for suffix in (".safetensors", ".json"):
        shutil.copy(victim.with_suffix(suffix), served.with_suffix(suffix))
    assert settings["http_port"] == int(DOCUMENTED_PORT)
    # The documented ports become free ones, on loopback only (MLServer binds 0.0.0.0).
    ports = {key: free_port() for key in ("http_port", "grpc_port", "metrics_port")}
    (models / "settings.json").write_text(json.dumps({**settings, **ports, "host": "127.0.0.1"}))

    port = ports["http_port"]
    args = served_here(line, port)
    model = option(args, "--victim")
    assert model == f"http://127.0.0.1:{port}/v2/models/{name}"
    log = workdir / "mlserver.log"
    with server_process([mlserver, *shlex.split(start)[1:]], f"{model}/ready", log, cwd=workdir):
        before = mlserver_count(model)
        result = run_attack(args, workdir)
        after = mlserver_count(model)
        # A new client learns the count and the budget from the metadata, before any query.
        with RemoteOracle(model) as remote:
            known = (remote.queries_used, remote.budget)
        # One more image: its headers state the runtime's count and the documented budget.
        shape = [1, *json.loads(victim.with_suffix(".json").read_text())["input_shape"]]
        one = {
            "name": "images",
            "datatype": "FP32",
            "shape": shape,
            "data": [0.5] * math.prod(shape),
        }
        extra = httpx.post(f"{model}/infer", json={"inputs": [one]})
    assert result["queries_used"] == after - before
    assert known == (after, model_settings["parameters"]["extra"]["budget"])
    assert extra.status_code == 200, extra.text
    budget = model_settings["parameters"]["extra"]["budget"]
    assert extra.headers["x-queries-used"] == str(after + 1)
    assert extra.headers["x-query-budget"] == str(budget)
    assert extra.headers["x-queries-remaining"] == str(budget - after - 1)
