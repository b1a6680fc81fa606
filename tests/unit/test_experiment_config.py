"""Experiment config files are read through their declared keys: defaults written once,
mistakes named by file, key and rule, every shipped config readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megex.experiments.query_efficiency import DEFAULTS, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_no_file_gives_the_defaults_and_a_file_updates_them(tmp_path):
    assert load_config(None) == DEFAULTS
    config = load_config(_write(tmp_path, {"budgets": [1000], "settings": {"ngf": 16}}))
    assert config["budgets"] == [1000]
    # "settings" is merged key by key; the other shared settings stay.
    assert config["settings"] == {**DEFAULTS["settings"], "ngf": 16}
    assert load_config(None)["settings"]["ngf"] == 8  # the defaults were not changed


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"budgets": [1000, 0]}, "budgets[1]: expected a whole number >= 1, got 0"),
        ({"budgets": 1000}, "budgets: expected a list"),
        ({"seeds": [0.5]}, "seeds[0]: expected a whole number >= 0"),
        ({"dataset": "imagenet"}, "dataset: expected one of"),
        ({"targets": [0.8, 1.2]}, "targets: expected fractions in (0, 1)"),
        ({"settings": [1, 2]}, "settings: expected an object"),
        ({"budget": [1000]}, "unknown keys ['budget']"),
        ({"methods": ["megex-everything"]}, "method: unknown 'megex-everything'"),
    ],
)
def test_a_mistake_is_named_with_what_was_expected(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert message in str(err.value)


def test_a_null_where_the_default_is_null_or_allowed(tmp_path):
    config = load_config(_write(tmp_path, {"tuned_settings": None, "victim_arch": None}))
    assert config["tuned_settings"] is None and config["victim_arch"] is None


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CONFIGS.glob("*.json") if not p.name.startswith(("tradeoff", "detection"))),
)
def test_every_shipped_benchmark_config_is_read(path):
    config = load_config(path)
    assert config["budgets"] and all(b > 0 for b in config["budgets"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("tradeoff*.json")))
def test_every_shipped_tradeoff_config_is_read(path):
    from megex.experiments.tradeoff import load_config as load_tradeoff

    config = load_tradeoff(path)
    assert config["defenses"][0] == [] and config["attackers"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("detection*.json")))
def test_every_shipped_detection_config_is_read(path):
    from megex.experiments.detection import load_config as load_detection

    config = load_detection(path)
    assert config["methods"] and config["queries"] > 0


def test_the_tradeoff_config_checks_its_rows_and_quick_keys(tmp_path):
    from megex.experiments.tradeoff import load_config as load_tradeoff

    assert load_tradeoff(CONFIGS / "tradeoff-14.json")["defenses"][0] == []
    with pytest.raises(ValueError, match=r"defenses\[1\]: expected a list"):
        load_tradeoff(_write(tmp_path, {"defenses": [[], "noise:0.5"]}))
    with pytest.raises(ValueError, match="utility_threshold: expected a number"):
        load_tradeoff(_write(tmp_path, {"utility_threshold": 2}))
    bad_quick = _write(tmp_path, {"quick": {"budget": [10]}})
    load_tradeoff(bad_quick)  # the quick keys are read only under --quick
    with pytest.raises(ValueError, match=r"quick: unknown keys \['budget'\]"):
        load_tradeoff(bad_quick, quick=True)


def test_the_detection_config_names_its_mistakes(tmp_path):
    from megex.experiments.detection import DEFAULTS as DETECTION
    from megex.experiments.detection import load_config as load_detection

    assert load_detection(None) == DETECTION
    with pytest.raises(ValueError, match=r"benign_kinds\[1\]: expected one of"):
        load_detection(_write(tmp_path, {"benign_kinds": ["clean", "shouting"]}))
    with pytest.raises(ValueError, match="target_fpr: expected a number"):
        load_detection(_write(tmp_path, {"target_fpr": 1}))
    with pytest.raises(ValueError, match="monitor: unknown 'lasso'"):
        load_detection(_write(tmp_path, {"monitors": {"lasso": {}}}))
