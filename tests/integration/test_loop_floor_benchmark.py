"""benchmarks/loop_floor.py at toy size: each method is run as the benchmark runs it, broken
down into parts that add up to its total, and set against a floor whose passes are counted;
the table and the JSON hold every method, and bad arguments are named."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import save_tiny_victim

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "loop_floor.py"
METHODS = ["dfme", "megex-predicted"]
QUERIES = 2000


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loop_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_method_is_measured_broken_down_and_floored(tmp_path, bench):
    victim = save_tiny_victim(tmp_path)
    out = tmp_path / "floor.json"
    argv = ["--queries", str(QUERIES), "--repeats", "1", "--methods", *METHODS]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--victim", str(victim), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout
    doc = json.loads(out.read_text())
    assert list(doc["methods"]) == METHODS and doc["queries"] == QUERIES
    # The evaluations the benchmark plans for this budget: the config's marks below it.
    assert doc["eval_at"] == [1000, QUERIES]

    for name, m in doc["methods"].items():
        # The summary row and the breakdown's column.
        assert sum(line.startswith(f"| {name} | ") for line in table.splitlines()) == 1
        # The ledger's count: whole steps within the budget, less than a step short of it.
        assert all(q == m["queries"] for q in m["queries_each_run"])
        assert m["queries"] % m["iteration_cost"] == 0
        assert 0 <= QUERIES - m["queries"] < m["iteration_cost"]
        assert m["evaluations"] == 2
        assert m["measured_s_per_1k"] > 0 and all(t > 0 for t in m["runs_s_per_1k"])
        assert 0 < m["measured_less_evaluation_s_per_1k"] < m["measured_s_per_1k"]

        breakdown = m["breakdown"]
        parts = breakdown["ms_per_1k"]
        assert set(parts) == set(bench.PARTS)
        assert all(v >= 0 for v in parts.values()), parts
        total = breakdown["total_ms_per_1k"]
        assert total > 0
        assert sum(parts.values()) == pytest.approx(total, rel=0.05)
        assert sum(breakdown["percent"].values()) == pytest.approx(100, rel=0.05)
        # What every method pays: answers, clone updates (fresh and replayed), generator,
        # evaluation and checkpoints; and the clock costs little.
        for part in ("victim", "clone_fresh", "replay", "generator_forward", "evaluation"):
            assert parts[part] > 0, part
        assert parts["checkpoints"] > 0
        assert 0.5 < breakdown["instrumented_over_measured"] < 2

        floor = m["floor"]
        assert floor["ms_per_1k"] > 0 and all(v > 0 for v in floor["pieces_ms_per_1k"].values())
        assert sum(floor["pieces_ms_per_1k"].values()) == pytest.approx(floor["ms_per_1k"])
        assert m["measured_over_floor"] > 0
        assert m["measured_over_floor"] == pytest.approx(
            m["measured_s_per_1k"] * 1e3 / floor["ms_per_1k"]
        )
        passes = floor["passes"]
        # The engine's allotment (the benchmark's shared setting), and one victim forward
        # per query; the run's own counts agree with the floor's.
        assert passes["clone_updates"] == 25 and passes["victim_forwards"] == 1000
        assert floor["passes_text"].startswith("25 clone updates of 128")
        assert "; 1000 victim forwards" in floor["passes_text"]
        assert floor["passes_text"] in table
        assert m["counted_per_1k"]["clone_updates"] == pytest.approx(25, abs=0.5)
        assert m["counted_per_1k"]["generator_updates"] == pytest.approx(passes["generator_steps"])

    dfme, megex = doc["methods"]["dfme"], doc["methods"]["megex-predicted"]
    # DFME asks for no maps; MEGEX's every query (the clone's too, as tuned) gets one map of
    # one class, one backward pass each, timed as megex.explain computes it.
    assert dfme["breakdown"]["ms_per_1k"]["maps"] == 0 and dfme["floor"]["maps_timed_by"] is None
    assert dfme["floor"]["passes"]["victim_backwards"] == 0
    assert dfme["floor"]["passes"]["generator_steps"] == pytest.approx(1000 / 512)
    assert megex["breakdown"]["ms_per_1k"]["maps"] > 0
    assert megex["floor"]["passes"]["victim_backwards"] == 1000
    assert "megex.explain" in megex["floor"]["maps_timed_by"]
    assert megex["floor"]["passes"]["generator_steps"] == pytest.approx(1000 / 384)
    # MEGEX's clone, as tuned, also matches the maps of its own 2 queries per step (the
    # replayed answers keep none): those updates are floored with the map term's passes.
    assert dfme["floor"]["passes"]["clone_updates_with_map_term"] == 0
    assert megex["floor"]["passes"]["clone_updates_with_map_term"] == pytest.approx(2000 / 384)
    assert "(5.21 with the maps' term)" in megex["floor"]["passes_text"]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--queries", "0"], "--queries: expected a whole number >= 1, got 0"),
        (["--repeats", "-1"], "--repeats: expected a whole number >= 1"),
        (["--methods", "dfme", "knockoff"], "--methods: 'knockoff' is not one of"),
        (["--victim", "no/such/file.safetensors"], "--victim: no file at"),
    ],
)
def test_bad_arguments_are_named(bench, argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


def test_a_budget_under_one_step_is_refused_plainly(bench, tmp_path, capsys):
    victim = save_tiny_victim(tmp_path)
    argv = ["--queries", "100", "--repeats", "1", "--methods", "dfme"]
    assert bench.main([*argv, "--victim", str(victim)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loop_floor: budget: 100 queries is less than one iteration of dfme")
