"""The trade-off grid at toy scale (digits): runs, utility, verdicts, resume."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_support import SMALL_SETTINGS, untrained_victims

from megex.cli import main
from megex.cli.studies import add_tradeoff_arguments
from megex.experiments import tradeoff
from megex.experiments.tradeoff import report as tradeoff_report
from megex.experiments.tradeoff import summary as tradeoff_summary


def _config(tmp_path, **extra) -> str:
    doc = {
        "dataset": "digits",
        "validation_images": 200,
        "victim_seeds": [0, 1],
        "seeds": [0, 1],
        "budgets": [300],
        "eval_at": [100],
        "attackers": ["megex-all"],
        "defenses": [[], ["gaussian:2"], ["sign"], ["round:1"]],
        "utility_images": 40,
        "settings": SMALL_SETTINGS,
        "tuned_settings": None,
        **extra,
    }
    path = tmp_path / "tradeoff.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_grid_runs_each_attacker_naive_and_adaptive_and_reports(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    untrained_victims(out, [0, 1], 200)
    argv = ["tradeoff", "--config", _config(tmp_path), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "tradeoff.json").read_text())
    rows = {r["defense"]: r for r in summary["rows"]}
    assert list(rows) == ["none", "gaussian:2", "sign", "round:1"]
    # DFME runs without a defence and under the prediction defence only; the adaptive
    # attacker runs where it has something to adapt to.
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 4 * (2 + 2 + 2 + 2)
    assert {r.rsplit("-v", 1)[0] for r in runs} == {
        "dfme-none", "megex-all-none", "megex-all-gaussian_2", "megex-all+adaptive-gaussian_2",
        "megex-all-sign", "megex-all+adaptive-sign", "dfme-round_1", "megex-all-round_1",
    }  # fmt: skip
    sign = rows["sign"]["methods"]
    # The defence counts against the stronger of the naive and the adaptive attacker.
    stronger = max(
        ("megex-all", "megex-all+adaptive"), key=lambda m: sign[m]["accuracy"]["estimate"]
    )
    weaker = ({"megex-all", "megex-all+adaptive"} - {stronger}).pop()
    assert sign[stronger]["counted"] and "counted" not in sign[weaker]
    assert sign["megex-all+adaptive"]["minus_baseline"]["pairs"] == 4
    # The explanation defence's row compares with DFME's undefended runs.
    assert sign["dfme"] == rows["none"]["methods"]["dfme"]
    assert rows["round:1"]["methods"]["dfme"] != rows["none"]["methods"]["dfme"]
    # Utility: the undefended maps are the reference; noise and sign move them.
    assert abs(rows["none"]["utility"]["cosine"] - 1) < 1e-6
    assert rows["gaussian:2"]["utility"]["cosine"] < 0.8
    assert rows["round:1"]["utility"]["probability_l1"] > 0
    assert rows["none"]["stops_explanation_attackers"] is False
    for row in summary["rows"]:
        assert row["keeps_utility"] == (row["utility"]["cosine"] >= 0.5)
        expected = bool(row["stops_explanation_attackers"]) and row["keeps_utility"]
        assert (row["defense"] in summary["effective"]) == expected
    # The plot draws the variant the table counts.
    points = dict(tradeoff_report.plotted_points(summary, "megex-all")["sign"])
    assert points[rows["sign"]["utility"]["cosine"]] == 100 * sign[stronger]["accuracy"]["estimate"]
    table = (out / "tradeoff.md").read_text()
    assert "| sign |" in table and "Without a defence, megex-all" in table
    assert "Attack settings: untuned" in table
    assert (out / "tradeoff.png").stat().st_size > 1000
    # The utility is kept beside the runs, with what it was measured on.
    kept = json.loads((out / "utility.json").read_text())
    assert set(kept["utility"]) == set(rows) and kept["measured_on"]["utility_images"] == 40

    def not_again(*args, **kwargs):
        raise AssertionError("the kept utility was measured again")

    # Started again: every run is found finished, and the utility is read back.
    monkeypatch.setattr(tradeoff, "measure_utility", not_again)
    capsys.readouterr()
    assert main(argv + ["--no-plot"]) == 0
    assert capsys.readouterr().err.count("already done") == len(runs)
    again = json.loads((out / "tradeoff.json").read_text())
    assert [r["utility"] for r in again["rows"]] == [r["utility"] for r in summary["rows"]]
    # Measured on other images, it is measured again.
    other = ["tradeoff", "--config", _config(tmp_path, utility_images=20), "--out", str(out)]
    with pytest.raises(AssertionError, match="the kept utility was measured again"):
        main([*other, "--no-progress", "--no-plot"])


def test_bad_settings_are_refused_before_any_training(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["tradeoff", "--config", _config(tmp_path), "--out", str(out), "--no-progress"]
    assert main([*argv, "--defense", "blur:3"]) == 2
    assert "unknown 'blur'" in capsys.readouterr().err
    assert not (out / "victims").exists()
    bad = _config(tmp_path, utility_threshold=2)
    assert main(["tradeoff", "--config", bad, "--out", str(out)]) == 2
    assert "utility_threshold" in capsys.readouterr().err


def test_a_defense_row_given_twice_is_run_once(tmp_path):
    args = add_tradeoff_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--defense",
            "sign",
            "--defense",
            "gaussian:2+sign",
            "--defense",
            "sign",
            "--defense",
            "gaussian:2+sign",
            "--settings-file",
            "none",
            "--config",
            _config(tmp_path),
        ]  # fmt: skip
    )
    config = tradeoff.configured(args)
    assert config["defenses"] == [[], ["sign"], ["gaussian:2", "sign"]]


def test_quick_grid_is_a_subset_of_the_full_one():
    full, quick = tradeoff.load_config(None), tradeoff.load_config(None, quick=True)
    assert quick["defenses"][0] == [] and len(quick["defenses"]) < len(full["defenses"])
    assert set(map(tuple, quick["defenses"])) <= set(map(tuple, full["defenses"]))
    assert max(quick["budgets"]) <= max(full["budgets"])


def _finished(method, row, accuracies, budget=1000):
    """Run results of one method under one defence row: accuracies[victim][seed]."""
    return [
        {
            "method": method,
            "defense_row": row,
            "victim_seed": victim,
            "seed": seed,
            "victim_accuracy": 0.9,
            "budgets": [budget],
            "metrics": [{"queries": budget, "clone_accuracy": value}],
        }
        for victim, by_seed in enumerate(accuracies)
        for seed, value in enumerate(by_seed)
    ]


def _grid_config(attackers):
    return {
        "budgets": [1000],
        "baseline": "dfme",
        "attackers": attackers,
        "defenses": [[], ["sign"], ["gaussian:2"]],
        "utility_threshold": 0.5,
        "seeds": [0, 1],
        "tuned_settings": None,
    }


UTILITY = {
    "none": {0: {"cosine": 1.0}},
    "sign": {0: {"cosine": 0.7}},
    "gaussian:2": {0: {"cosine": 0.4}},
}
DFME = [[0.50, 0.52], [0.48, 0.51], [0.49, 0.50]]


def _shifted(by):
    return [[v + by + 0.002 * (i + j) for j, v in enumerate(s)] for i, s in enumerate(DFME)]


def test_a_defense_stops_a_lead_only_if_neither_variant_keeps_it():
    finished = [
        *_finished("dfme", "none", DFME),
        *_finished("megex-all", "none", _shifted(0.20)),  # well ahead without a defence
        # sign: the naive attacker falls to DFME's level, the adaptive one stays 5 points
        # ahead, so the lead is not stopped.
        *_finished("megex-all", "sign", _shifted(-0.01)),
        *_finished("megex-all+adaptive", "sign", _shifted(0.05)),
        # gaussian: both variants fall to DFME's level.
        *_finished("megex-all", "gaussian:2", _shifted(0.0)),
        *_finished("megex-all+adaptive", "gaussian:2", _shifted(-0.02)),
    ]
    summary = tradeoff_summary.summarise(finished, UTILITY, _grid_config(["megex-all"]), 1.0)
    rows = {r["defense"]: r for r in summary["rows"]}
    assert summary["undefended_lead"] == {"megex-all": "a ahead"}
    assert summary["leading_attackers"] == ["megex-all"]
    assert rows["sign"]["stops_explanation_attackers"] is False
    assert rows["sign"]["methods"]["megex-all+adaptive"]["counted"]
    assert rows["gaussian:2"]["stops_explanation_attackers"] is True
    # gaussian:2 stops the lead but keeps too little utility; sign keeps utility, stops none.
    assert summary["effective"] == []
    # What the defence took: about 20 points from the naive attacker under gaussian:2.
    taken = rows["gaussian:2"]["methods"]["megex-all"]["minus_undefended"]
    assert abs(taken["mean"] + 0.20) < 1e-9 and taken["verdict"] == "b ahead"
    table = tradeoff_report.markdown(summary)
    assert "What each defence took from each attacker" in table
    assert "| gaussian:2 | -20.0 [" in table


def test_a_prediction_defense_that_stops_the_lead_is_named_with_its_cost_to_the_answers():
    finished = [
        *_finished("dfme", "none", DFME),
        *_finished("megex-all", "none", _shifted(0.20)),
        *_finished("dfme", "round:1", _shifted(-0.30)),
        *_finished("megex-all", "round:1", _shifted(-0.30)),
    ]
    config = {**_grid_config(["megex-all"]), "defenses": [[], ["round:1"]]}
    utility = {
        "none": {0: {"cosine": 1.0, "probability_l1": 0.0, "label_kept": 1.0}},
        "round:1": {0: {"cosine": 1.0, "probability_l1": 0.057, "label_kept": 0.98}},
    }
    summary = tradeoff_summary.summarise(finished, utility, config, 1.0)
    assert summary["effective"] == ["round:1"]
    table = tradeoff_report.markdown(summary)
    assert "`round:1` (on the predictions: probabilities moved by L1 0.057" in table
    assert "top-1 label kept on 98.0% of images)" in table


def test_without_an_undefended_lead_no_defense_is_named():
    finished = [
        *_finished("dfme", "none", DFME),
        *_finished("megex-all", "none", _shifted(0.0)),
        *_finished("megex-all", "sign", _shifted(-0.10)),
        *_finished("megex-all+adaptive", "sign", _shifted(-0.12)),
        *_finished("megex-all", "gaussian:2", _shifted(-0.05)),
    ]
    summary = tradeoff_summary.summarise(finished, UTILITY, _grid_config(["megex-all"]), 1.0)
    assert summary["leading_attackers"] == []
    assert [r["stops_explanation_attackers"] for r in summary["rows"]] == [False, None, None]
    assert summary["effective"] == []
    table = tradeoff_report.markdown(summary)
    assert "no defence had a lead to stop" in table and "stopped)" not in table


def test_quick_runs_are_kept_apart_from_the_full_grid():
    parser = add_tradeoff_arguments(argparse.ArgumentParser())
    assert tradeoff.runs_folder_name(parser.parse_args(["--quick"])) == "runs-quick"
    assert tradeoff.runs_folder_name(parser.parse_args([])) == "runs"
