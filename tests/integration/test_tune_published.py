"""Each method's published settings as one more trial of its search (digits; the trials'
scores replaced by a function of their settings, so nothing trains but the tuning victim)."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_support import bench_config as _config
from bench_support import untrained_victims

from megex.cli.bench import add_tune_arguments
from megex.experiments import tuning as tune
from megex.experiments.methods import METHODS
from megex.experiments.tuning import published, trials

PUBLISHED_DFME = {"clone_lr": 0.1, "generator_lr": 1e-4, "directions": 1, "epsilon": 1e-3}


def _parser():
    return add_tune_arguments(argparse.ArgumentParser())


def _scored_by_settings(monkeypatch, calls):
    """Trials scored without running: 0.9 for DFME's published point, 0.5 otherwise."""

    def score(method, settings, attack, victim, evaluator, search, device, **where):
        calls.append({k: settings[k] for k in PUBLISHED_DFME})
        value = 0.9 if all(settings[k] == v for k, v in PUBLISHED_DFME.items()) else 0.5
        return value, {str(s): [[search["budget"], value]] for s in search["seeds"]}

    monkeypatch.setattr(trials, "score", score)


def _search(tmp_path, monkeypatch):
    """(output folder, tune's argv, the scored trials' settings): dfme, 2 trials."""
    pytest.importorskip("optuna")
    out = tmp_path / "tuning"
    untrained_victims(out / "victims", [tune.SEARCH["victim_seed"]], 200)
    argv = ["--config", _config(tmp_path), "--out", str(out), "--trials", "2", "--budget",
            "300", "--methods", "dfme"]  # fmt: skip
    calls: list[dict] = []
    _scored_by_settings(monkeypatch, calls)
    return out, argv, calls


def test_a_finished_study_gains_its_published_trial_once_and_chooses_it_when_best(
    tmp_path, monkeypatch
):
    out, argv, calls = _search(tmp_path, monkeypatch)
    doc = tune.run_search(_parser().parse_args(argv + ["--no-published-trial"]))
    assert len(calls) == 2 and doc["trials"]["dfme"] == 2 and "published" not in doc
    assert doc["search"]["published_trial"] is False

    # Run again: the study has its searched trials, so only the published one runs, after
    # them, with the values outside the space moved (5 clone steps to the space's 3).
    calls.clear()
    doc = tune.run_search(_parser().parse_args(argv))
    assert calls == [PUBLISHED_DFME]
    row = doc["published"]["dfme"]
    assert row == {"trial": 2, "value": 0.9, "moved": {"clone_steps": [5, 3]}}
    assert doc["trials"]["dfme"] == 3 and doc["validation_score"]["dfme"] == 0.9
    chosen = doc["methods"]["dfme"]
    assert {k: chosen[k] for k in PUBLISHED_DFME} == PUBLISHED_DFME
    assert chosen["clone_steps"] == 3 and chosen["victim_confidence"] == 0.0
    # A third call runs nothing and writes the same file.
    calls.clear()
    assert tune.run_search(_parser().parse_args(argv)) == doc
    assert calls == [] and json.loads((out / "tuned.json").read_text()) == doc


def test_a_new_study_runs_its_published_trial_first_and_judges_it_beside_the_searched(
    tmp_path, monkeypatch
):
    out, argv, calls = _search(tmp_path, monkeypatch)
    doc = tune.run_search(_parser().parse_args(argv))
    assert calls[0] == PUBLISHED_DFME and len(calls) == 3
    assert doc["published"]["dfme"]["trial"] == 0 and doc["trials"]["dfme"] == 3
    import optuna

    study = optuna.load_study(study_name="dfme", storage=f"sqlite:///{out / 'studies.db'}")
    judged = trials.judged_trials(study, 2)
    assert [t.number for t in judged] == [0, 1, 2]
    assert [published.is_published(t) for t in judged] == [True, False, False]


def test_every_searched_method_has_published_settings_inside_its_space():
    optuna = pytest.importorskip("optuna")
    searched = [m for m in METHODS if "tuned_as" not in METHODS[m]]
    for method in searched:
        params, moved = published.published_params(
            method, METHODS[method]["attack"], METHODS[method]
        )
        # An Optuna trial fixed at those values takes every one of them (none out of range).
        fixed = optuna.trial.FixedTrial(params)
        with_warnings = trials.search_space(fixed, METHODS[method]["attack"], METHODS[method])
        assert with_warnings == params, method
        for name, (was, now) in moved.items():
            assert params[name] == now and was != now, (method, name)
    assert published.published_params("disguide", "disguide")[0]["clone_lr"] == 0.03


def test_a_method_without_published_settings_is_named():
    with pytest.raises(KeyError, match="no published settings for 'nope'"):
        published.published_params("nope", "dfme")
