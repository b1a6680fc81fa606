"""`megex attack --pool` through the command: a knockoff-maps run killed with SIGKILL and
resumed equals an uninterrupted one, the attack runs against a real `megex serve`, and bad
pool input is a one-line error that leaves no run folder."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megex.cli import main
from megex.runs import RunFolder
from megex.victim import train_victim

KEY = "pool-attack-key"


@pytest.fixture(scope="module")
def victim_file(tmp_path_factory) -> Path:
    """A digits victim that held out 200 validation and 300 pool images (about 5 s)."""
    torch.manual_seed(0)
    victim = train_victim("digits", validation_images=200, pool_images=300, progress=False)
    return victim.save(tmp_path_factory.mktemp("victim") / "digits.safetensors")


def _megex(*argv: str) -> list[str]:
    return [sys.executable, "-m", "megex", *argv]


def _env() -> dict[str, str]:
    # Read at call time: the test's own cache folder (conftest) goes to the subprocess.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock times (the only figures a resume may change)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def test_knockoff_maps_killed_and_resumed_equals_an_uninterrupted_run(
    tmp_path, victim_file, capsys
):
    argv = [
        "attack", "--method", "knockoff-maps", "--victim", str(victim_file),
        "--pool", "digits:unseen:200", "--budget", "200", "--eval-every", "40",
        "--set", "query_batch=20", "--set", "clone_updates_per_1k_queries=250",
        # The clone learns as the answers come: the checkpoints hold a clone mid-training.
        "--set", "training=streaming", "--quiet", "--json",
    ]  # fmt: skip
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    killed = subprocess.Popen(
        _megex(*argv, "--out", str(killed_dir)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (killed_dir / "checkpoint.pt").exists():
            assert killed.poll() is None, f"it ended before its first checkpoint: {killed.stderr}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        killed.kill()
        killed.stderr.close()
    assert not (killed_dir / "result.json").exists()  # it was killed mid-run
    assert RunFolder(killed_dir).load_checkpoint()["queries_spent"] in (40, 80, 120, 160)

    resumed = subprocess.Popen(
        _megex(*argv, "--out", str(killed_dir), "--resume"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    # The same command uninterrupted, here while the resumed run goes on in its process.
    assert main([*argv, "--out", str(straight_dir)]) == 0
    straight = json.loads(capsys.readouterr().out)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    a, b = RunFolder(straight_dir), RunFolder(killed_dir)
    assert [row["queries"] for row in a.read_metrics()] == [40, 80, 120, 160, 200]
    assert _untimed(b.read_metrics()) == _untimed(a.read_metrics())
    second = json.loads(out)
    assert straight["queries_used"] == second["queries_used"] == 200
    assert straight["clone_accuracy"] == second["clone_accuracy"]
    assert straight["fidelity"] == second["fidelity"]
    assert a.read_result()["clone_accuracy"] == b.read_result()["clone_accuracy"]
    assert a.read_config()["pool"] == b.read_config()["pool"]
    assert a.read_config()["pool"]["spec"] == "digits:unseen:200"


def test_knockoff_maps_against_megex_serve(tmp_path, victim_file, capsys):
    pytest.importorskip("fastapi")
    from megex.sqlite_ledger import SQLiteLedger

    db, log = tmp_path / "ledger.sqlite", tmp_path / "serve.log"
    argv = ["serve", "--victim", str(victim_file), "--port", "0", "--key", KEY, "--db", str(db)]
    with open(log, "w") as server_log:
        server = subprocess.Popen(
            _megex(*argv), stdout=subprocess.PIPE, stderr=server_log, text=True, env=_env()
        )
    try:
        assert select.select([server.stdout], [], [], 60)[0], "no ready line within 60 s"
        url = json.loads(server.stdout.readline())["address"]
        attack = [
            "attack", "--method", "knockoff-maps", "--victim", url, "--api-key", KEY,
            "--pool", "digits:unseen:100", "--budget", "100", "--set", "query_batch=20",
            "--dataset", "digits", "--quiet", "--json",
        ]  # fmt: skip
        reference = ["--reference-victim", str(victim_file), "--out", str(tmp_path / "r")]
        assert main([*attack, *reference]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["queries_used"] == 100
        assert result["clone_accuracy"] > 0.5 and result["fidelity"] > 0.5  # chance: 0.1
        assert result["details"]["explanation"]["target"] == "all"

        # A URL does not say which images its victim trained on: unseen needs its file.
        no_file = tmp_path / "no-reference"
        assert main([*attack, "--out", str(no_file)]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and "Traceback" not in message
        assert message.startswith("megex attack: error: --pool:")
        assert "--reference-victim" in message and not no_file.exists()
    finally:
        server.terminate()
        server.communicate(timeout=30)
    ledger = SQLiteLedger(db, keys={KEY: None})
    try:
        assert ledger.usage(ledger.authenticate(KEY).id).used == 100
    finally:
        ledger.close()


def _png_folder(path: Path, count: int, size: int) -> str:
    from PIL import Image

    path.mkdir()
    for i in range(count):
        Image.new("L", (size, size), color=16 * i).save(path / f"{i}.png")
    return str(path)


@pytest.mark.parametrize(
    "case", ["missing folder", "no images", "wrong size", "data-free method", "no pool"]
)
def test_bad_pool_input_is_one_line_and_leaves_no_run_folder(tmp_path, victim_file, capsys, case):
    out = tmp_path / "run"
    method, pool, status, expected = "knockoff", None, 2, "--pool"
    if case == "missing folder":
        pool, status = f"folder:{tmp_path / 'nowhere'}", 1
        expected = "--pool: pool 'folder:"
    elif case == "no images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image\n")
        pool, expected = f"folder:{tmp_path / 'empty'}", "no .png, .jpg or .jpeg files"
    elif case == "wrong size":
        pool, expected = f"folder:{_png_folder(tmp_path / 'big', 3, 28)}", "is 28x28"
    elif case == "data-free method":
        method, pool, expected = "megex", "digits:unseen:10", "--pool: megex is data-free"
    argv = ["attack", "--method", method, "--victim", str(victim_file), "--budget", "100"]
    argv += ["--out", str(out), "--quiet"] + (["--pool", pool] if pool else [])
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("megex attack: error: --pool"), err
    assert expected in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_a_budget_below_one_request_says_what_a_request_costs(tmp_path, victim_file, capsys):
    out = tmp_path / "run"
    argv = ["attack", "--method", "knockoff-maps-adaptive", "--victim", str(victim_file)]
    argv += ["--pool", "digits:unseen:100", "--budget", "100", "--set", "map_repeats=4"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "--budget: 100 queries is less than one iteration of knockoff-maps-adaptive (200 = "
        "one request: query_batch 50 x map_repeats 4); raise --budget or lower query_batch"
    ), err
    assert "\n" not in err and not out.exists()
