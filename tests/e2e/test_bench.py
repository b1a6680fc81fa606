"""The benchmark's fair protocol, its statistics, and the tuning search (small, on digits)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_support import SMALL, untrained_victims
from bench_support import bench_config as _config

from megex import stats
from megex.cli import main as megex_main
from megex.cli.bench import add_tune_arguments
from megex.experiments import methods
from megex.experiments import query_efficiency as bench


def test_quick_benchmark_pairs_runs_and_reports_intervals(tmp_path, capsys):
    config = _config(tmp_path)
    untrained_victims(tmp_path / "out", [0, 1], bench.load_config(config)["validation_images"])
    argv = [
        "--config", config, "--quick", "--out", str(tmp_path / "out"), "--victim-seeds", "0",
        "1", "--seeds", "0", "1", "--methods", "megex-all", "dfme", "--no-progress",
    ]  # fmt: skip
    assert megex_main(["bench", *argv]) == 0
    summary = json.loads((tmp_path / "out" / "query_efficiency_quick.json").read_text())
    cell = summary["stats"]["megex-all"]["600"]
    assert cell["runs"] == 4
    interval = cell["interval"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert cell["vs_baseline"]["pairs"] == 4
    # The verdict follows from the two intervals reported beside it.
    diff = cell["vs_baseline"]
    assert diff["low"] <= diff["mean"] <= diff["high"]
    if diff["low"] > 0 and diff["t_low"] > 0:
        assert diff["verdict"] == "a ahead"
    elif diff["high"] < 0 and diff["t_high"] < 0:
        assert diff["verdict"] == "b ahead"
    else:
        assert diff["verdict"] == "no difference measured"
    assert summary["seeds"] == [0, 1]
    # Compute is recorded per budget: the same clone updates per query for both methods.
    from megex.runs import read_metrics

    for method in ("megex-all", "dfme"):
        assert summary["stats"][method]["600"]["clone_updates"] > 0
        for row in read_metrics(
            tmp_path / "out" / "runs-quick" / f"{method}-v1-s0" / "metrics.jsonl"
        ):
            allotted = int(80 * row["queries"] / 1000)
            assert allotted <= row["clone_updates"] <= allotted + 2
    assert set(summary["queries_to_reach"]) == {"0.8", "0.9"}
    table = (tmp_path / "out" / "query_efficiency_quick.md").read_text()
    assert "(2 victim(s) x 2 attack seed(s))" in table
    for heading in ("Paired difference", "Queries to reach", "Compute at each budget"):
        assert heading in table
    assert (tmp_path / "out" / "query_efficiency_quick_reach.png").stat().st_size > 1000
    assert "| megex-all |" in table
    # A second call finds the finished runs and skips them.
    capsys.readouterr()
    assert megex_main(["bench", *argv + ["--no-plot"]]) == 0
    assert "already done" in capsys.readouterr().err
    # Against another method of the runs: its own table beside the config's, nothing run.
    assert megex_main(["bench", *argv + ["--no-plot", "--baseline", "megex-all"]]) == 0
    err = capsys.readouterr().err
    assert "already done" in err and "query_efficiency_quick_vs_megex-all.md" in err
    against = json.loads(
        (tmp_path / "out" / "query_efficiency_quick_vs_megex-all.json").read_text()
    )
    assert against["baseline"] == "megex-all"
    assert against["stats"]["dfme"]["600"]["vs_baseline"]["baseline"] == "megex-all"
    assert "vs_baseline" not in against["stats"]["megex-all"]["600"]
    mean = against["stats"]["dfme"]["600"]["vs_baseline"]["mean"]
    assert mean == pytest.approx(-cell["vs_baseline"]["mean"])  # the same pairs, other sign
    # A baseline that is not run beside the others is refused before anything runs.
    assert megex_main(["bench", *argv + ["--baseline", "disguide"]]) == 2
    err = capsys.readouterr().err
    assert "--baseline: disguide is not among the methods run (megex-all, dfme)" in err
    # A benchmark stopped part-way: --finished-only runs nothing and tables the (seed,
    # victim) pairs that every method finished, so that the table stays paired.
    (tmp_path / "out" / "runs-quick" / "dfme-v1-s1" / "result.json").unlink()
    assert megex_main(["bench", *argv + ["--no-plot", "--finished-only"]]) == 0
    assert "already done" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs-quick" / "dfme-v1-s1" / "result.json").exists()
    partial = json.loads((tmp_path / "out" / "query_efficiency_quick_partial.json").read_text())
    assert partial["partial"] == {"runs": 6, "planned": 8}
    assert partial["stats"]["megex-all"]["600"]["runs"] == 3
    assert partial["stats"]["megex-all"]["600"]["vs_baseline"]["pairs"] == 3
    text = (tmp_path / "out" / "query_efficiency_quick_partial.md").read_text()
    assert text.startswith("**Partial: 6 of the 8 planned runs**")
    # The full table was not overwritten by the partial one.
    assert json.loads((tmp_path / "out" / "query_efficiency_quick.json").read_text())[
        "stats"
    ]["megex-all"]["600"]["runs"] == 4  # fmt: skip
    for run in (tmp_path / "out" / "runs-quick").iterdir():
        if run.is_dir():
            (run / "result.json").unlink(missing_ok=True)
    assert megex_main(["bench", *argv + ["--no-plot", "--finished-only"]]) == 2
    assert "no (seed, victim) pair has every method finished" in capsys.readouterr().err
    # Other settings in the same output folder: refused, not silently reported as done.
    config = _config(tmp_path, settings={**SMALL, "clone_updates_per_1k_queries": 60.0})
    assert megex_main(["bench", *argv + ["--no-plot"]]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "clone_updates_per_1k_queries: 80.0 then, 60.0 now" in err


def test_settings_come_from_the_search_and_variants_take_their_methods(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"methods": {"megex-all": {"clone_lr": 0.05}}}))
    config = bench.load_config(_config(tmp_path, tuned_settings=str(tuned)))
    found = methods.load_tuned(config)
    _, settings = methods.method_settings(config, "megex-all", found)
    assert settings["clone_lr"] == 0.05 and settings["explanation"] == "gradient-all"
    _, prior = methods.method_settings(config, "megex-all+prior", found)
    assert prior["clone_lr"] == 0.05 and prior["query_gamma"] == methods.PRIOR
    # The data-free methods carry no prior.
    assert "query_gamma" not in methods.method_settings(config, "dfme", found)[1]
    # A method the search has not finished is refused, not run with untuned settings.
    import argparse

    args = argparse.Namespace(
        budgets=None, quick=True, seeds=None, methods=["dfme"], device=None, data_root=None,
        threads=1, fresh=False, no_progress=True, jobs=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no settings for 'dfme'"):
        bench.plan(config, args, tmp_path, {0: tmp_path / "v.safetensors"})
    config["tuned_settings"] = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="run megex tune"):
        methods.load_tuned(config)


def test_the_published_dfme_takes_the_papers_settings_and_is_never_searched(tmp_path):
    from megex.attacks.presets import DFME_PAPER
    from megex.experiments.tuning.search import _check_methods

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"methods": {"dfme": {"clone_lr": 0.05, "ngf": 8}}}))
    config = bench.load_config(_config(tmp_path, tuned_settings=str(tuned)))
    found = methods.load_tuned(config)
    attack, settings = methods.method_settings(config, "dfme-paper", found)
    published = {k: v for k, v in DFME_PAPER.items() if k != "lr_schedule"}
    assert attack == "dfme" and {k: settings[k] for k in published} == published
    # Neither dfme's searched settings nor this loop's shared ones (a narrow generator, a
    # weight average) reach it; its schedule is constant.
    assert "clone_lr" not in settings and settings["ngf"] == 64
    assert settings["clone_ema"] == 0.0 and settings["lr_schedule"] == "constant"
    methods.require_tuned(config, "dfme-paper", found)  # needs no search
    with pytest.raises(ValueError, match="'dfme-paper' is not a searched method"):
        _check_methods(["dfme-paper"])


def test_a_benchmark_stopped_part_way_holds_every_method_on_the_same_runs(tmp_path):
    import argparse

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"methods": {"megex-all": {}, "dfme": {}}}))
    config = bench.load_config(_config(tmp_path, tuned_settings=str(tuned)))
    config.update(methods=["megex-all", "dfme"], assumption_methods=[], seeds=[0, 1])
    victims = {0: tmp_path / "v0.safetensors", 1: tmp_path / "v1.safetensors"}

    def jobs(quick: bool) -> list:
        args = argparse.Namespace(
            budgets=None, quick=quick, seeds=None, methods=None, device=None, data_root=None,
            threads=1, fresh=False, no_progress=True, jobs=2,
        )  # fmt: skip
        return bench.plan(config, args, tmp_path, victims)

    full = jobs(quick=False)
    order = [(j["seed"], j["victim_seed"], j["method"]) for j in full]
    # Seed, then victim, then method: any prefix of whole blocks is a paired table.
    assert order == [
        (s, v, m) for s in (0, 1) for v in (0, 1) for m in ("megex-all", "dfme")
    ]  # fmt: skip
    # The quick grid's shorter runs never land in (and are never refused by) the full runs.
    quick_dirs = {Path(j["run_dir"]).parent for j in jobs(quick=True)}
    assert quick_dirs == {tmp_path / "runs-quick"}
    assert {Path(j["run_dir"]).parent for j in full} == {tmp_path / "runs"}


def test_the_leakage_config_names_the_strongest_attacker_with_every_kind_of_map():
    from pathlib import Path

    config = bench.load_config(
        Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "leakage.json"
    )
    assert config["targets"] == [0.5, 0.7, 0.8, 0.9] and min(config["eval_at"]) == 1000
    kinds = set()
    for method in config["methods"]:
        attack, settings = methods.method_settings(config, method)
        if method.startswith("megex-jacobian"):
            assert settings["replay_maps"] and settings["explain_clone_queries"]
            kinds.add(methods.EXPLANATIONS[settings["explanation"]]["method"])
    assert kinds == {"gradient", "smoothgrad", "integrated_gradients", "input_x_gradient"}
    # MEGEX as published runs beside it wherever both were searched, and DFME is the baseline.
    assert {"megex-all", "megex-predicted", "megex-smoothgrad"} <= set(config["methods"])
    assert config["baseline"] == "dfme" and "dfme" in config["methods"]


def test_the_paper_configs_load_without_the_fashion_mnist_prior():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
    for name in ("svhn.json", "cifar10.json"):
        config = bench.load_config(configs / name)
        assert config["device"] == "cuda" and config["settings"]["clone"] == "resnet18_8x"
        for method in config["methods"]:
            assert "query_gamma" not in methods.method_settings(config, method)[1]


def test_tuning_search_runs_resumes_and_writes_the_settings(tmp_path):
    pytest.importorskip("optuna")
    from megex.experiments import tuning as tune

    config = _config(tmp_path)
    parser = add_tune_arguments(__import__("argparse").ArgumentParser())
    out = tmp_path / "tuning"
    argv = ["--config", config, "--out", str(out), "--trials", "1", "--budget", "300"]
    doc = tune.run_search(parser.parse_args(argv + ["--methods", "dfme"]))
    # One searched trial and the published settings' one.
    assert doc["trials"]["dfme"] == 2 and doc["search"]["budget"] == 300
    assert {"directions", "epsilon", "generator_lr"} <= set(doc["methods"]["dfme"])
    # Asked again for more trials, the study continues from the one it has.
    doc = tune.run_search(
        parser.parse_args(argv[:-3] + ["2", "--budget", "300", "--methods", "dfme"])
    )
    assert doc["trials"]["dfme"] == 3 and doc["published"]["dfme"]["trial"] == 0
    _, settings = methods.method_settings(
        bench.load_config(_config(tmp_path, tuned_settings=str(out / "tuned.json"))),
        "dfme",
        json.loads((out / "tuned.json").read_text()),
    )
    assert settings["directions"] == doc["methods"]["dfme"]["directions"]


def test_a_method_with_a_prior_is_compared_with_the_baseline_under_the_same_prior():
    from megex.experiments.query_efficiency.summary import baseline_for

    methods = {"dfme", "dfme+prior", "megex-all", "megex-all+prior", "megex-predicted+prior"}
    assert baseline_for("megex-all", "dfme", methods) == "dfme"
    assert baseline_for("megex-all+prior", "dfme", methods) == "dfme+prior"
    assert baseline_for("dfme", "dfme", methods) is None
    assert baseline_for("dfme+prior", "dfme", methods) is None
    # No baseline with the same prior: no comparison (never against a data-free run).
    assert baseline_for("megex-all+prior", "dfme", {"dfme", "megex-all+prior"}) is None


def test_t_quantiles_match_the_printed_table():
    # Two-sided 95% critical values from a printed t table.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 10: 2.228, 30: 2.042}
    for df, expected in table.items():
        assert math.isclose(stats.t_quantile(0.975, df), expected, abs_tol=5e-4)
    assert math.isclose(stats.t_quantile(0.995, 2), 9.925, abs_tol=5e-4)
    assert stats.t_quantile(0.025, 4) == -stats.t_quantile(0.975, 4)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="df must be a positive integer"):
        stats.t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(high - mean, 4.303 / math.sqrt(3), abs_tol=1e-3)


def test_hierarchical_bootstrap_and_paired_differences():
    # Three victims that differ a lot, seeds that differ little: the victim dominates.
    data = {v: {s: 0.5 + 0.1 * v + 0.001 * s for s in range(3)} for v in range(3)}
    est, low, high = stats.bootstrap_interval(data)
    assert low < est < high and math.isclose(est, 0.601, abs_tol=1e-9)
    parts = stats.variance_components(data)
    assert parts["victim_share"] > 0.99
    # b is a + 0.02 on every run: b ahead, with a tight interval around -0.02.
    b = {v: {s: x + 0.02 for s, x in seeds.items()} for v, seeds in data.items()}
    d = stats.paired_difference(data, b)
    assert d["pairs"] == 9 and d["verdict"] == "b ahead"
    assert math.isclose(d["mean"], -0.02, abs_tol=1e-9)
    # Noise around zero: no difference is claimed.
    noise = {v: {s: x + (0.01 if (v + s) % 2 else -0.01) for s, x in seeds.items()}
             for v, seeds in data.items()}  # fmt: skip
    assert stats.paired_difference(data, noise)["verdict"] == "no difference measured"
    # One pair has no interval: no verdict, not "no difference".
    one = stats.paired_difference({0: {0: 0.7}}, {0: {0: 0.5}})
    assert one["pairs"] == 1 and one["verdict"] == "one pair, no interval"
    # Three victims whose differences all lie above 0 but disagree: the bootstrap's top
    # level resamples three values and excludes 0; the t interval (2 degrees of freedom)
    # does not, so no lead is claimed.
    spread = {v: {s: x + 0.01 + 0.02 * v for s, x in seeds.items()} for v, seeds in data.items()}
    d = stats.paired_difference(spread, data)
    assert d["low"] > 0 and d["units"] == 3
    assert d["t_low"] < 0 < d["t_high"] and d["verdict"] == "no difference measured"
    # ... and that lead is the victims' (their differences vary, the seeds' do not).
    assert d["spread"]["victim_share"] > 0.99 and d["spread"]["seed_var"] < 1e-12
    # A lead that varies with the seed alone is none of the victim's.
    seedy = {v: {s: x + 0.02 * s for s, x in seeds.items()} for v, seeds in data.items()}
    assert stats.paired_difference(seedy, data)["spread"]["victim_share"] == 0.0
    # One victim: the seeds are the t interval's units.
    single = stats.paired_difference(
        {0: {0: 0.70, 1: 0.71, 2: 0.72}}, {0: {0: 0.5, 1: 0.5, 2: 0.5}}
    )
    assert single["units"] == 3 and single["t_low"] > 0 and single["verdict"] == "a ahead"
    # The victim's share needs two victims and a repeated seed on one of them.
    assert stats.variance_components({0: {0: 0.5, 1: 0.6}})["victim_share"] is None
    assert stats.variance_components({0: {0: 0.5}, 1: {0: 0.7}})["victim_share"] is None


def test_wilson_interval_ends_symmetry_and_coverage():
    from megex.stats import wilson_interval

    z2 = 1.959963984540054**2
    # Closed forms at the ends: 0 of n has high z^2 / (n + z^2); n of n has low n / (n + z^2).
    assert wilson_interval(0, 60) == (0.0, pytest.approx(z2 / (60 + z2)))
    assert wilson_interval(15, 15) == (pytest.approx(15 / (15 + z2)), 1.0)
    low, high = wilson_interval(9, 60)
    mirrored = wilson_interval(51, 60)
    assert (low, high) == (pytest.approx(1 - mirrored[1]), pytest.approx(1 - mirrored[0]))
    # Its actual coverage, summed exactly over the binomial, is near the level asked for.
    for p, n in [(0.05, 60), (0.3, 50), (0.5, 20)]:
        coverage = sum(
            math.comb(n, k) * p**k * (1 - p) ** (n - k)
            for k in range(n + 1)
            if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1]
        )
        assert 0.92 < coverage < 0.98, (p, n, coverage)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(5, 4)


def test_censored_queries_to_reach_give_a_one_sided_ratio():
    """A run that never reached the target needed more than its largest budget: counted as
    that budget, it bounds its pair's ratio from one side; the bound is reported only when
    every censored pair bounds from the same side, and the two methods have the same runs."""
    import math

    from megex.experiments.query_efficiency.summary import _queries_saved, saved_cell

    runs = [
        {"victim_seed": v, "seed": s, "budgets": [50_000, 100_000]} for v in (0, 1) for s in (0, 1)
    ]
    method = {0: {0: 10_000, 1: 20_000}, 1: {0: 10_000, 1: 40_000}}
    baseline_missed = {0: {0: 50_000, 1: 80_000}, 1: {0: 100_000}}  # v1 s1: never

    def geometric_mean(ratios: list[float]) -> float:
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    bound = _queries_saved(method, baseline_missed, runs, runs)
    assert set(bound) == {"saved_x_at_least"}
    assert bound["saved_x_at_least"]["estimate"] == pytest.approx(
        geometric_mean([5.0, 4.0, 10.0, 100_000 / 40_000])
    )
    assert saved_cell(bound, "dfme").startswith("; dfme needs >= ")
    # Only the method missed (v0 s0): an upper bound, the miss counted as 100k.
    method_missed = {0: {1: 20_000}, 1: {0: 10_000, 1: 40_000}}
    full_base = {0: {0: 50_000, 1: 80_000}, 1: {0: 100_000, 1: 60_000}}
    upper = _queries_saved(method_missed, full_base, runs, runs)
    assert set(upper) == {"saved_x_at_most"}
    assert upper["saved_x_at_most"]["estimate"] == pytest.approx(
        geometric_mean([0.5, 4.0, 10.0, 1.5])
    )
    # A miss counts as that run's own largest budget, not the largest of all runs.
    short = [
        {**r, "budgets": [50_000]} if (r["victim_seed"], r["seed"]) == (1, 1) else r for r in runs
    ]
    lower = _queries_saved(method, baseline_missed, runs, short)
    assert lower["saved_x_at_least"]["estimate"] == pytest.approx(
        geometric_mean([5.0, 4.0, 10.0, 50_000 / 40_000])
    )
    # Sides mixed, a pair where both missed, or runs that do not pair: no bound at all.
    assert _queries_saved(method_missed, baseline_missed, runs, runs) == {}
    assert _queries_saved({0: {0: 1, 1: 1}, 1: {0: 1}}, baseline_missed, runs, runs) == {}
    assert _queries_saved(method, baseline_missed, runs, runs[:3]) == {}


def test_an_attacker_with_maps_is_compared_with_itself_without_them():
    """disguide-maps-predicted against disguide (what the maps add to that attacker), where
    both are in the runs; megex against dfme, the table's baseline, as before."""
    from types import SimpleNamespace

    from megex.experiments.query_efficiency.report import markdown
    from megex.experiments.query_efficiency.summary import summarise

    methods_present = {"dfme", "disguide", "disguide-maps-predicted", "megex-predicted"}
    assert baseline_of("disguide-maps-predicted", methods_present) == "disguide"
    assert baseline_of("megex-predicted", methods_present) == "dfme"
    assert baseline_of("disguide", methods_present) == "dfme"
    # Without disguide in the runs it falls back to the table's baseline.
    assert baseline_of("disguide-maps-predicted", {"dfme", "disguide-maps-predicted"}) == "dfme"

    # Accuracy at 1k and 2k queries: disguide-maps-predicted 20 points over disguide on
    # every run, disguide 5 under dfme.
    level = {"dfme": 0.5, "disguide": 0.45, "disguide-maps-predicted": 0.65}
    finished = [
        {
            "method": method,
            "victim_seed": v,
            "seed": s,
            "victim_accuracy": 0.9,
            "budgets": [1000, 2000],
            "wall_s": 1.0,
            "metrics": [
                {
                    "queries": q,
                    "clone_accuracy": acc + 0.01 * v + 0.002 * s + q / 1e5,
                    "clone_updates": 1,
                    "generator_updates": 1,
                    "elapsed_s": 1.0,
                }
                for q in (1000, 2000)
            ],
        }
        for method, acc in level.items()
        for v in range(3)
        for s in range(2)
    ]
    config = {**bench.load_config(None), "targets": [0.5, 0.7]}
    config["tuned_settings"] = None
    args = SimpleNamespace(threads=1, jobs=1, ray=None)
    summary = summarise(finished, config, 1.0, args)
    vs = summary["stats"]["disguide-maps-predicted"][2000]["vs_baseline"]
    assert vs["baseline"] == "disguide" and vs["mean"] == pytest.approx(0.20)
    assert summary["stats"]["disguide"][2000]["vs_baseline"]["baseline"] == "dfme"
    reach = summary["queries_to_reach"]["0.7"]["disguide-maps-predicted"]
    assert reach["baseline"] == "disguide"
    text = markdown(summary)
    assert "| disguide-maps-predicted - disguide | 20.0" in text
    assert "| disguide | -5.0" in text
    assert "disguide needs >= 2.00 [2.00, 2.00]x" in text


def baseline_of(method: str, present: set[str]) -> str | None:
    from megex.experiments.query_efficiency.summary import baseline_for

    return baseline_for(method, "dfme", present)
