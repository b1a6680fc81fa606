"""benchmarks/serving_routes.py at toy size: every installed route (megex serve, KServe,
MLServer) is started, timed beside the in-process floor, and answers the first batch as
LocalOracle does; the table is written as JSON and markdown, and a mismatch is reported."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server extra is not installed")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from server_support import images, save_tiny_victim  # noqa: E402

from megex import LocalOracle, Victim  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "serving_routes.py"
    spec = importlib.util.spec_from_file_location("serving_routes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "serving-routes.json").read_text()), (
        out / "serving-routes.md"
    ).read_text()


def test_every_installed_route_is_timed_and_answers_as_local_oracle(bench, tmp_path, capsys):
    victim = save_tiny_victim(tmp_path)
    out = tmp_path / "out"
    argv = ["--queries", "256", "--batch", "128", "--repeats", "1", "--warmup", "1"]
    assert bench.main([*argv, "--victim", str(victim), "--out", str(out)]) == 0
    doc, table = _read(out)
    skipped = doc["skipped"]
    if os.environ.get("MEGEX_REQUIRE_SERVERS") == "1":
        assert skipped == {}
    assert set(skipped) <= {"kserve", "mlserver"} and all(skipped.values())
    expected = {("local", "-"), ("megex", "json"), ("megex", "binary")}
    expected |= {("kserve", p) for p in ("json", "binary") if "kserve" not in skipped}
    expected |= {("mlserver", "json")} if "mlserver" not in skipped else set()
    rows = doc["rows"]
    assert sorted((r["route"], r["protocol"], r["maps"]) for r in rows) == sorted(
        (route, protocol, maps) for route, protocol in expected for maps in (False, True)
    )
    assert doc["queries"] == 256 and doc["batch"] == 128 and doc["repeats"] == 1
    for r in rows:
        assert r["matches_local_oracle"] and r["mismatch"] is None, r
        assert len(r["runs_ms_per_1k"]) == 1 and r["runs_ms_per_1k"][0] > 0
        assert r["min"] == r["ms_per_1k_queries"] == r["max"]
        floor = next(f for f in rows if f["route"] == "local" and f["maps"] == r["maps"])
        ratio = r["ms_per_1k_queries"] / floor["ms_per_1k_queries"]
        assert r["x_in_process"] == pytest.approx(ratio, abs=0.01)
    # An all-class map costs a backward pass per class: more than a prediction in-process.
    local = {r["maps"]: r["ms_per_1k_queries"] for r in rows if r["route"] == "local"}
    assert local[True] > local[False]
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(body) == len(rows) + 1  # and the header
    assert all(line.endswith("| yes |") for line in body[1:])
    assert "MISMATCH" not in capsys.readouterr().out


def test_a_route_that_answers_differently_is_reported(bench, tmp_path, capsys, monkeypatch):
    victim = Victim.load(save_tiny_victim(tmp_path))
    x = images(4, seed=1)
    expected = LocalOracle(victim).query(x, bench.MAPS)
    assert bench.compare(LocalOracle(victim).query(x, bench.MAPS), expected) is None
    changed = LocalOracle(victim).query(x, bench.MAPS)
    changed.explanation[0, 3] += 1e-3
    assert "maps differ by up to 0.001" in bench.compare(changed, expected)
    changed.probabilities[1] = torch.roll(changed.probabilities[1], 1)
    assert "probabilities differ" in bench.compare(changed, expected)
    assert "maps: missing" in bench.compare(LocalOracle(victim).query(x), expected)

    # A mismatch reaches the table, the JSON, the terminal and the exit status.
    monkeypatch.setattr(bench, "compare", lambda got, want: "maps differ by up to 0.5")
    out = tmp_path / "out"
    argv = ["--routes", "local", "--queries", "16", "--batch", "8", "--repeats", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 1
    doc, table = _read(out)
    assert [r["matches_local_oracle"] for r in doc["rows"]] == [False, False]
    assert table.count("**NO**: maps differ by up to 0.5") == 2
    assert "MISMATCH in-process (LocalOracle)" in capsys.readouterr().out
