"""The input-size sweep: its configs, and a toy-scale run of two sizes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megex.cli import main as megex_main
from megex.experiments import input_size as dimension
from megex.experiments import methods
from megex.experiments import query_efficiency as bench
from megex.models import build_classifier
from megex.victim import Victim

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


@pytest.mark.parametrize("size", list(dimension.SIZES))
def test_every_size_has_a_config_with_the_sweeps_methods_and_the_tuned_settings(size):
    config = bench.load_config(CONFIGS / f"dim-{size}.json")
    dataset, d = dimension.SIZES[size]
    assert config["dataset"] == dataset and f"d = {d}" in config["description"]
    assert config["methods"] == ["megex-all", "megex-predicted", "dfme", "dfme-m10"]
    assert config["baseline"] == "dfme" and config["targets"] == [0.5, 0.6, 0.7, 0.8]
    assert len(config["seeds"]) == 3 and len(config["victim_seeds"]) == 3
    # Every size searches its own settings, the same way; the benchmark reads that output.
    assert config["search"] == {
        "methods": ["megex-all", "megex-predicted", "dfme"], "trials": 10, "budget": 50000,
        "confirm_trials": 3,
    }  # fmt: skip
    assert config["tuned_settings"] == f"benchmarks/results/dims/{size}/tuning/tuned.json"
    assert f"dims/{size}/tuning" in config["description"]
    # m is pinned whatever the search chose for DFME; the rest is DFME's searched settings.
    tuned = {"methods": {"dfme": {"directions": 5, "epsilon": 0.02}}}
    for method, m in (("dfme", 1), ("dfme-m10", 10)):
        attack, settings = methods.method_settings(config, method, tuned)
        assert attack == "dfme" and settings["directions"] == m
        assert settings["epsilon"] == 0.02 and settings["clone"] == "lenet5"
        assert settings["lr_schedule"] == "constant"
    assert methods.METHODS["dfme-m10"]["tuned_as"] == "dfme"


def _toy_configs(folder: Path, sizes: list[str], searched_at: tuple[str, ...] = ()) -> Path:
    """The sweep's own configs at toy scale: small batches, one evaluation; a search of one
    trial per method at the sizes `searched_at`, elsewhere a tuned file of our own."""
    folder.mkdir(parents=True)
    tuned = folder / "tuned.json"
    searched = {"dfme": {"directions": 5, "epsilon": 0.01}, "megex-all": {}, "megex-predicted": {}}
    tuned.write_text(json.dumps({"methods": searched}))
    for size in sizes:
        doc = json.loads((CONFIGS / f"dim-{size}.json").read_text())
        doc["settings"].update({"batch_size": 16, "nz": 16, "clone_updates_per_1k_queries": 60.0})
        doc.update({"tuned_settings": str(tuned), "eval_at": [], "quick_budgets": [300]})
        doc["search"] = (
            {**doc["search"], "trials": 1, "budget": 300, "confirm_seeds": [102]}
            if size in searched_at
            else None
        )
        (folder / f"dim-{size}.json").write_text(json.dumps(doc))
    return folder


def _untrained_victim(out: Path, size: str, seed: int = 0, under: str = "") -> None:
    """A victim at the benchmark's (or the search's) cache path (training them is tested
    elsewhere)."""
    dataset, _ = dimension.SIZES[size]
    shape = {"14": (1, 14, 14), "colour-56": (3, 56, 56)}[size]
    victim = Victim(
        build_classifier("lenet5", 10, shape[0], shape[1]), shape, 10, arch="lenet5",
        dataset=dataset,
    )  # fmt: skip
    victim.accuracy = 0.5
    folder = out / size / under / "victims"
    victim.save(folder / f"{dataset}-lenet5-seed{seed}-val5000.safetensors")


@pytest.mark.slow
def test_the_sweep_runs_each_size_and_writes_one_table_across_sizes(
    tmp_path, fashion_mnist, capsys
):
    pytest.importorskip("optuna")
    sizes = ["14", "colour-56"]
    configs = _toy_configs(tmp_path / "configs", sizes, searched_at=("14",))
    out = tmp_path / "dims"
    for size in sizes:
        _untrained_victim(out, size)
    _untrained_victim(out, "14", seed=100, under="tuning")
    common = ["--configs", str(configs), "--out", str(out), "--quick", "--no-progress"]
    # Every method at 14x14, after that size's own search; at 3x56x56 (each run evaluates
    # on 10,000 test images of 9,408 values) the two that differ most, with a tuned file
    # given, the way a sweep is continued one size at a time.
    assert megex_main(["input-size", "--sizes", "14", *common, "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "megex tune --config" in err and "--trials 1 --budget 300" in err
    assert "--confirm-trials 3 --confirm-seeds 102" in err
    found = json.loads((out / "14" / "tuning" / "tuned.json").read_text())
    # One searched trial and the published settings' one per method.
    assert found["trials"] == {"megex-all": 2, "megex-predicted": 2, "dfme": 2}
    # Both trials of each method were scored again on the confirmation seed.
    for row in found["confirmation"].values():
        assert [list(r["seed_scores"]) for r in row["rows"]] == [["102"]] * 2
    methods = ["--methods", "megex-all", "dfme-m10"]
    assert megex_main(["input-size", "--sizes", "colour-56", *common, *methods, "--no-plot"]) == 0
    capsys.readouterr()
    # One size run alone keeps the sizes finished before it in the table across sizes.
    alone = json.loads((out / "dimension_quick.json").read_text())
    assert [r["size"] for r in alone["sizes"]] == ["14", "colour-56"]
    assert megex_main(["input-size", "--sizes", *sizes, *common, "--summary-only"]) == 0
    assert "megex bench" not in capsys.readouterr().err
    summary = json.loads((out / "dimension_quick.json").read_text())
    assert [(r["size"], r["d"]) for r in summary["sizes"]] == [("14", 196), ("colour-56", 9408)]
    every = {"megex-all", "megex-predicted", "dfme", "dfme-m10"}
    assert set(summary["sizes"][0]["methods"]) == every
    assert set(summary["sizes"][1]["methods"]) == {"megex-all", "dfme-m10"}
    for row in summary["sizes"]:
        assert row["budget"] == 300 and row["victim_accuracy"] == 0.5
        for method in row["methods"].values():
            assert 0.0 <= method["accuracy"]["estimate"] <= 1.0
            assert set(method["reach"]) == {"0.5", "0.6", "0.7", "0.8"}
    # DFME ran with m = 1 and m = 10 whatever the tuned file said, with the rest of the
    # settings from that size's search (14) or the given file (colour-56).
    searched = found["methods"]["dfme"]["epsilon"]
    for size, method, m, epsilon in (
        ("14", "dfme", 1, searched),
        ("colour-56", "dfme-m10", 10, 0.01),
    ):
        run = json.loads(
            (out / size / "runs-quick" / f"{method}-v0-s0" / "config.json").read_text()
        )
        assert run["directions"] == m and run["epsilon"] == epsilon
    assert run["input_shape"] == [3, 56, 56]
    table = (out / "dimension_quick.md").read_text()
    assert "| 14 | 196 | 50.0% | dfme-m10 |" in table
    assert "| colour-56 | 9408 | 50.0% | megex-all |" in table
    assert (out / "dimension_quick.png").stat().st_size > 1000


def test_the_sweep_checks_every_sizes_options_before_running_any(tmp_path, capsys):
    argv = ["--configs", str(CONFIGS), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        megex_main(["input-size", *argv, "--jobz", "2"])
    assert info.value.code == 2 and "--jobz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert megex_main(["input-size", "--configs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no dim-14.json" in capsys.readouterr().err
    assert megex_main(["input-size", *argv, "--summary-only"]) == 1


@pytest.mark.parametrize(
    "search, expected",
    [
        ({"trials": 10}, "needs 'methods'"),
        ({"methods": "dfme"}, "needs 'methods'"),
        ({"methods": ["dfme"], "confirm_trial": 3}, "unknown keys ['confirm_trial']"),
        (["dfme"], "must be an object"),
    ],
)
def test_a_bad_search_block_is_refused_before_anything_runs(tmp_path, capsys, search, expected):
    configs = tmp_path / "configs"
    configs.mkdir()
    doc = json.loads((CONFIGS / "dim-14.json").read_text())
    doc["search"] = search
    (configs / "dim-14.json").write_text(json.dumps(doc))
    out = tmp_path / "dims"
    assert (
        megex_main(["input-size", "--sizes", "14", "--configs", str(configs), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "dim-14.json" in err and expected in err and "Traceback" not in err
    assert not out.exists()


def test_the_plot_shows_queries_saved_with_bounds_marked(tmp_path):
    pytest.importorskip("matplotlib")
    nan = float("nan")

    def ratio(e, lo, hi):
        return {"estimate": e, "low": lo, "high": hi}

    summary = {
        "sizes": [
            {"d": 196, "baseline": "dfme", "methods": {
                "dfme": {"reach": {"0.5": {"median": ratio(2e4, 1e4, 3e4)}}},
                "megex-all": {"reach": {"0.5": {"saved_x": ratio(1.5, 1.1, 2.0)}}},
            }},
            {"d": 784, "baseline": "dfme", "methods": {
                "dfme": {"reach": {"0.5": {}}},
                "megex-all": {"reach": {"0.5": {"saved_x_at_least": ratio(2.0, nan, nan)},
                                        "0.8": {"reached": 0, "runs": 9}}},
            }},
        ]
    }  # fmt: skip
    points = dimension.saved_points(summary, "megex-all", "0.5")
    # A bound without an interval is drawn at its estimate; the baseline has no ratio.
    assert points == [(196, "saved_x", 1.5, 1.1, 2.0), (784, "saved_x_at_least", 2.0, 2.0, 2.0)]
    assert dimension.saved_points(summary, "megex-all", "0.8") == []
    assert dimension.saved_points(summary, "dfme", "0.5") == []
    assert dimension.plot(summary, tmp_path / "d.png").stat().st_size > 1000
    # Nothing measured at all: still a figure, which says so.
    empty = {"sizes": [{**summary["sizes"][0], "methods": {"dfme": {"reach": {}}}}]}
    assert dimension.plot(empty, tmp_path / "e.png").stat().st_size > 1000
