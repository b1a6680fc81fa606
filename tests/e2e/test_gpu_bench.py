"""benchmarks/gpu.py at toy size on the CPU: every section runs and reports its figures."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    # The README's command, with --out in the test's folder.
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rates = report["matrix_rate_tflops"]
    assert set(rates) == {"bf16", "fp32"} and all(0 < r < math.inf for r in rates.values())
    rows = report["throughput"]
    assert {(r["method"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("megex", "dfme") for mode in ("plain", "fast")
    }
    plain = {r["method"]: r["flops_per_query"] for r in rows if r["mode"] == "plain"}
    # MEGEX's victim explains every class (a backward pass per class): more per query.
    assert plain["megex"] > plain["dfme"] > 0
    # Measured figures are positive by nature; the derived ones must follow from them.
    for row in rows:
        qps = row["queries_per_s"]
        assert qps > 0
        # Each derived figure was computed before queries_per_s was rounded to 0.1, and is
        # rounded itself: it may differ by both roundings.
        rel = 0.05 / qps + 1e-6
        minutes = 20e6 / qps / 60
        assert abs(row["minutes_for_20M"] - minutes) <= rel * minutes + 0.005, row
        kind = "fp32" if row["mode"] == "plain" else "bf16"
        achieved = plain[row["method"]] * qps / (rates[kind] * 1e12)
        assert abs(row[f"fraction_of_{kind}_rate"] - achieved) <= rel * achieved + 5e-5, row
    runs = report["paper_run"]
    assert [r["method"] for r in runs] == ["megex-all", "megex-jacobian", "dfme"]
    for r in runs:
        assert 0 < r["queries"] <= 600 and 0 <= r["clone_accuracy"] <= 1
        assert r["ratio"] == round(r["clone_accuracy"] / r["victim_accuracy"], 4)
    assert "figures in" in proc.stdout
