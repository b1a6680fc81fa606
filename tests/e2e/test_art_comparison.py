"""`megex art-peer` at toy scale (digits): ART's KnockoffNets and our knockoff side by side
with matched settings, the outputs, the resume, and the one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from megex.cli import main
from megex.experiments.art_comparison import RUNS_FILE, query_batch_for, training_length

BUDGET = 200


def _config(tmp_path, **changes) -> str:
    doc = {
        "dataset": "digits",
        "validation_images": 200,
        "pool_images": 300,
        "pool": "digits:unseen:200",
        "victim_seeds": [0],
        "seeds": [0, 1],
        **changes,
    }
    doc = {k: v for k, v in doc.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_training_length_follows_the_updates_per_query_rule():
    # ceil(budget / 64) batches per epoch; whole epochs up to 1 update per query.
    assert training_length(200) == (50, 200)
    assert training_length(1000) == (63, 1008)
    assert training_length(100, updates_per_1k=500) == (25, 50)
    assert [query_batch_for(b) for b in (200, 300, 120, 97)] == [50, 50, 40, 1]


def test_art_peer_runs_both_methods_reports_and_resumes(tmp_path, capsys):
    pytest.importorskip("art")
    out = tmp_path / "out"
    argv = ["art-peer", "--config", _config(tmp_path), "--budgets", str(BUDGET)]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first_log = capsys.readouterr().err
    summary = json.loads((out / "art_comparison.json").read_text())
    md = (out / "art_comparison.md").read_text()
    runs = [json.loads(line) for line in (out / RUNS_FILE).read_text().splitlines()]
    assert len(runs) == 2 * 2  # one victim x two seeds x two methods
    assert str(out / "art_comparison.json") in first_log

    (row,) = summary["rows"]
    assert (row["budget"], row["epochs"], row["clone_updates"]) == (BUDGET, 50, 200)
    for method in ("art-knockoffnets", "knockoff"):
        # Ten classes: chance is 0.1.
        assert row[method]["accuracy"]["mean"] > 0.5
        assert row[method]["accuracy"]["runs"] == 2
        assert row[method]["s_per_1k_queries"] > 0
    assert row["difference"]["pairs"] == 2
    by = {(r["seed"], r["method"]): r for r in runs}
    for seed in (0, 1):
        art, ours = by[(seed, "art-knockoffnets")], by[(seed, "knockoff")]
        assert art["clone_accuracy"] > 0.5 and ours["clone_accuracy"] > 0.5
        # The victim was shown exactly the budget, counted by ART's wrapper and our oracle.
        assert art["victim_images_seen"] == BUDGET and ours["queries_used"] == BUDGET
        # Matched: the same pool images, clone, batch and number of clone updates.
        assert art["pool"]["sha256"] == ours["pool"]["sha256"]
        for key in ("clone_arch", "lr", "batch_size", "clone_updates"):
            assert art["settings"][key] == ours["settings"][key]
    assert by[(0, "knockoff")]["pool"]["sha256"] != by[(1, "knockoff")]["pool"]["sha256"]
    assert "ART 1." in md and "KnockoffNets" in md and "megex knockoff" in md
    assert "| 200 | 50 (200) |" in md

    # A rerun finds every run finished: nothing runs, the tables are rewritten.
    assert main(argv) == 0
    second_log = capsys.readouterr().err
    assert len((out / RUNS_FILE).read_text().splitlines()) == 4
    assert second_log.count("finished before, skipped") == 4
    assert ": running" not in second_log
    assert json.loads((out / "art_comparison.json").read_text())["rows"] == summary["rows"]


def test_a_config_without_a_pool_is_a_usage_error(tmp_path, capsys):
    argv = ["art-peer", "--config", _config(tmp_path, pool=None), "--budgets", "100"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pool" in err and len(err.splitlines()) == 1


def test_without_art_it_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes `import art` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "art", None)
    argv = ["art-peer", "--config", _config(tmp_path), "--budgets", "100"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install 'megex[art]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "victims").exists()  # refused before training a victim
