"""The search's confirmation step: best trials scored again on more tuning seeds (digits)."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_support import bench_config as _config

from megex.cli.bench import add_tune_arguments
from megex.experiments import tuning as tune
from megex.experiments.tuning import confirm as tune_confirm
from megex.experiments.tuning import trials


def _parser():
    return add_tune_arguments(argparse.ArgumentParser())


def test_confirmation_chooses_by_the_mean_over_all_seeds_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    out = tmp_path / "tuning"
    argv = ["--config", _config(tmp_path), "--out", str(out), "--trials", "3", "--budget",
            "300", "--methods", "dfme", "--confirm-trials", "2",
            "--confirm-seeds", "7", "8", "--no-published-trial"]  # fmt: skip
    calls = []
    real_score = trials.score

    def counted(method, settings, attack, victim, evaluator, search, device, **where):
        calls.append(list(search["seeds"]))
        if len(calls) == 5:  # the search's 3 trials, then 2 confirmation runs: stop there
            raise KeyboardInterrupt
        return real_score(method, settings, attack, victim, evaluator, search, device, **where)

    monkeypatch.setattr(trials, "score", counted)
    with pytest.raises(KeyboardInterrupt):
        tune.run_search(_parser().parse_args(argv))
    assert calls[:3] == [[100, 101]] * 3 and calls[3:] == [[7], [8]]
    # Nothing chosen yet: the search's unconfirmed best is not written for the benchmark.
    assert not (out / "tuned.json").exists()

    calls.clear()
    doc = tune.run_search(_parser().parse_args(argv))
    # Resumed: the trials are kept, the one confirmation score kept too; the others run.
    assert calls == [[8], [7], [8]]
    confirmation = doc["confirmation"]["dfme"]
    assert confirmation["seeds"] == [7, 8]
    rows = confirmation["rows"]
    assert len(rows) == 2 and rows[0]["search_score"] >= rows[1]["search_score"]
    assert confirmation["chosen_by_search"] == rows[0]["trial"]
    for row in rows:
        assert set(row["seed_scores"]) == {"7", "8"}
        expected = (2 * row["search_score"] + sum(row["seed_scores"].values())) / 4
        assert row["mean"] == pytest.approx(expected)
        # The search's seeds, scored again from their curves, give back the search's score,
        # and the worst seed is the worst of all four.
        search_scores = row["search_seed_scores"]
        assert set(search_scores) == {"100", "101"}
        assert sum(search_scores.values()) / 2 == pytest.approx(row["search_score"])
        every = [*search_scores.values(), *row["seed_scores"].values()]
        assert row["worst_seed"] == min(every)
    chosen = max(rows, key=lambda r: r["mean"])
    assert doc["validation_score"]["dfme"] == pytest.approx(chosen["mean"])
    import optuna

    study = optuna.load_study(study_name="dfme", storage=f"sqlite:///{out / 'studies.db'}")
    assert doc["methods"]["dfme"] == study.trials[chosen["trial"]].params
    # The record names the method searched, not the default list.
    assert doc["search"]["methods"] == ["dfme"]
    # Each confirmation score sits in the study with its curve, and a third call scores
    # nothing again.
    stored = study.user_attrs[tune_confirm.confirm_key(rows[1]["trial"], 8)]
    assert stored["value"] == rows[1]["seed_scores"]["8"] and stored["curves"]["8"]
    calls.clear()
    assert tune.run_search(_parser().parse_args(argv)) == doc
    assert calls == []
    assert json.loads((out / "tuned.json").read_text()) == doc


def test_confirmation_settings_are_checked_before_anything_runs(tmp_path):
    out = tmp_path / "tuning"
    base = ["--config", _config(tmp_path), "--out", str(out), "--methods", "dfme"]
    with pytest.raises(ValueError, match=r"--confirm-seeds: \[101\] are already the search's"):
        tune.run_search(_parser().parse_args(base + ["--confirm-trials", "2",
                                                     "--confirm-seeds", "101", "5"]))  # fmt: skip
    with pytest.raises(ValueError, match="repeats a seed"):
        tune.run_search(_parser().parse_args(base + ["--confirm-seeds", "5", "5"]))
    with pytest.raises(SystemExit):
        _parser().parse_args(base + ["--confirm-trials", "-1"])
    assert not out.exists()
