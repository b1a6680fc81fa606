"""The detection benchmark at toy scale (digits, a few hundred queries per stream)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_support import SMALL_SETTINGS

from megex.cli import main as megex_main
from megex.detection import build_monitor
from megex.experiments import detection as detection_bench

pytest.importorskip("scipy")

torch.set_num_threads(1)


def _config(tmp_path, **extra) -> str:
    doc = {
        "dataset": "digits",
        "validation_images": 300,
        "settings": SMALL_SETTINGS,
        "methods": ["megex-all", "dfme", "megex-jacobian"],
        "monitors": {"prada": {}, "ood": {"window": 50}},
        "target_fpr": 0.2,
        "quick_queries": 250,
        "quick_seeds": [0],
        "quick_streams": 3,
        **extra,
    }
    path = tmp_path / "detection.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_quick_detection_benchmark_reports_rates_and_writes_calibrations(
    tmp_path, digits_victim, capsys
):
    # The session's digits victim stands in for the recipe's (training is tested elsewhere).
    victims = tmp_path / "victims"
    digits_victim.save(victims / "digits-small_cnn-seed0-val300.safetensors")
    out = tmp_path / "out"
    argv = ["--config", _config(tmp_path), "--quick", "--out", str(out), "--victims", str(victims)]
    assert megex_main(["detection", *argv]) == 0
    err = capsys.readouterr().err
    assert "warning: the attacks run untuned" in err and "detection_quick.md" in err
    summary = json.loads((out / "detection_quick.json").read_text())
    assert summary["queries"] == 250 and summary["tuned_settings"] is None
    assert set(summary["detection"]) == {"prada", "ood", "any"}
    for methods in summary["detection"].values():
        assert set(methods) == {"megex-all", "dfme", "megex-jacobian"}
        assert all(d["runs"] == 1 for d in methods.values())
    # DFME's probes lie next to the points they probe: PRADA sees them.
    dfme = summary["detection"]["prada"]["dfme"]
    assert dfme["detected"] == 1 and 100 <= dfme["median_queries"] <= 250
    # "any" is the earliest of the monitors.
    for run in summary["attack_runs"]:
        hits = [m["detected_at"] for m in run["monitors"].values() if m["detected_at"]]
        assert run["any_detected_at"] == (min(hits) if hits else None)
    for kinds in summary["false_positives"].values():
        assert set(kinds) == {"clean", "noise", "augment"}
        assert all(f["streams"] == 3 for f in kinds.values())
    # 9 validation streams at a 20% target: at most one of them flagged.
    for t in summary["thresholds"]:
        assert t["streams"] == 9 and t["calibration_fpr"] <= 1 / 9
        path = out / "calibration" / f"{t['monitor']}-digits-small_cnn-seed0.json"
        monitor = build_monitor(f"{t['monitor']}:calibration={path}")
        assert monitor.threshold == t["threshold"]
        assert monitor.calibrated_on["input_shape"] == [1, 8, 8]
    table = (out / "detection_quick.md").read_text()
    for heading in ("Attacks detected within 250 queries", "Benign test streams flagged"):
        assert heading in table
    assert "| prada | dfme | 1/1 |" in table


def test_detection_benchmark_refuses_bad_settings_before_training(tmp_path, capsys):
    config = _config(tmp_path)
    out = ["--out", str(tmp_path / "out"), "--victims", str(tmp_path / "victims")]
    for argv, status, message in [
        (["--quick", "--queries", "400"], 2, "is more than the 300 validation images"),
        (["--quick", "--methods", "megex-everything"], 2, "unknown 'megex-everything'"),
        (["--quick", "--target-fpr", "1.5"], 2, "--target-fpr: expected in [0, 1)"),
        (["--quick", "--threads", "0"], 2, "threads: expected >= 1, got 0"),
        (["--quick", "--settings-file", str(tmp_path / "none.json")], 1, "no file at"),
    ]:
        assert megex_main(["detection", "--config", config, *out, *argv]) == status, argv
        assert message in capsys.readouterr().err
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"methods": {"dfme": {}}}))
    argv = ["--config", config, *out, "--quick", "--settings-file", str(tuned)]
    assert megex_main(["detection", *argv]) == 2
    assert "has no settings for 'megex-all'" in capsys.readouterr().err
    bad = _config(tmp_path, monitors={"prada": {"window": 3}})
    assert megex_main(["detection", "--config", bad, *out, "--quick"]) == 2
    assert "prada has no setting 'window'" in capsys.readouterr().err
    assert not (tmp_path / "victims").exists()  # refused before any victim was trained


def test_benign_streams_draw_distinct_images_and_transform_them(digits_victim):
    pool = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = detection_bench.load_config(None)
    clean = detection_bench.benign_stream(pool, digits_victim, "clean", 40, 7, config)
    again = detection_bench.benign_stream(pool, digits_victim, "clean", 40, 7, config)
    assert torch.equal(clean.images, again.images) and len(clean) == 40
    assert len({tuple(x.flatten().tolist()) for x in clean.images}) == 40
    assert all(any(torch.equal(x, p) for p in pool) for x in clean.images)
    for kind in ("noise", "augment"):
        other = detection_bench.benign_stream(pool, digits_victim, kind, 40, 7, config)
        assert other.images.min() >= 0 and other.images.max() <= 1
        assert not torch.equal(other.images, clean.images)
        torch.testing.assert_close(
            other.probabilities, torch.softmax(digits_victim(other.images), 1)
        )
    with pytest.raises(ValueError, match="from a pool of 50"):
        detection_bench.benign_stream(pool, digits_victim, "clean", 51, 0, config)
