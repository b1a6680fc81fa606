"""The benchmark and the tuning search with an attacker's pool (small, on digits): each run
draws its images with its attack seed, the methods compared at one seed hold the same
images, and the run folders record which they were."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_support import bench_config

from megex.cli import main as megex_main
from megex.cli.bench import add_tune_arguments
from megex.models import build_classifier
from megex.pools import load_pool, victim_images
from megex.recipes import cached_victim_path
from megex.victim import Victim

POOL = {"pool": "digits:unseen:100", "pool_images": 300}
PLAIN = {"settings": {"clone_updates_per_1k_queries": 500.0, "query_batch": 20}}


def _untrained_victims(out, seeds):
    """Untrained digits victims at the benchmark's cache paths, which say (as a trained
    one's sidecar would) which images they held out."""
    for seed in seeds:
        victim = Victim(
            build_classifier("small_cnn", 10, 1, 8), (1, 8, 8), 10, arch="small_cnn",
            dataset="digits",
        )  # fmt: skip
        victim.accuracy = 0.5
        victim.metadata.update(validation_images=200, pool_images=300)
        victim.save(cached_victim_path(out / "victims", "digits", "small_cnn", seed, 200, 300))


def test_a_benchmark_with_a_pool_pairs_methods_on_the_same_images(tmp_path):
    config = bench_config(
        tmp_path, **POOL, **PLAIN, baseline="knockoff", methods=["knockoff", "knockoff-maps"],
        assumption_methods=[], quick_budgets=[60, 100], eval_at=[40],
    )  # fmt: skip
    out = tmp_path / "out"
    _untrained_victims(out, [0])
    argv = [
        "bench", "--config", config, "--quick", "--out", str(out), "--seeds", "0", "1",
        "--no-progress", "--no-plot",
    ]  # fmt: skip
    assert megex_main(argv) == 0
    summary = json.loads((out / "query_efficiency_quick.json").read_text())
    assert summary["stats"]["knockoff-maps"]["100"]["vs_baseline"]["baseline"] == "knockoff"
    # Their clones learn after all of a run's queries: one run per budget and mark.
    runs = sorted(p.name for p in (out / "runs-quick").iterdir() if p.is_dir())
    assert runs == sorted(
        f"{m}-v0-s{s}-b{b}" for m in ("knockoff", "knockoff-maps") for s in (0, 1)
        for b in (40, 60, 100)
    )  # fmt: skip
    assert [row[0] for row in summary["curves"]["knockoff-v0-s0"]] == [40, 60, 100]
    described = {}
    for method in ("knockoff", "knockoff-maps"):
        for seed in (0, 1):
            folder = out / "runs-quick" / f"{method}-v0-s{seed}-b100"
            run = json.loads((folder / "config.json").read_text())
            described[method, seed] = run["pool"]
            assert run["pool"]["spec"] == "digits:unseen:100" and run["pool"]["size"] == 100
    # The same images for both methods at one seed; another draw at another seed.
    assert described["knockoff", 0]["sha256"] == described["knockoff-maps", 0]["sha256"]
    assert described["knockoff", 0]["sha256"] != described["knockoff", 1]["sha256"]
    victim = Victim.load(next((out / "victims").glob("*pool300*.safetensors")))
    assert (
        load_pool("digits:unseen:100", victim_images(victim), seed=1).sha256
        == (described["knockoff", 1]["sha256"])
    )
    table = (out / "query_efficiency_quick.md").read_text()
    assert "| knockoff-maps |" in table and "| knockoff |" in table


def test_a_benchmark_refuses_an_attack_with_images_without_a_pool(tmp_path, capsys):
    config = bench_config(
        tmp_path, **PLAIN, baseline="knockoff", methods=["knockoff"], assumption_methods=[]
    )
    out = tmp_path / "out"
    _untrained_victims(out, [0])
    argv = ["bench", "--config", config, "--quick", "--out", str(out), "--seeds", "0",
            "--no-progress", "--no-plot"]  # fmt: skip
    assert megex_main(argv) != 0
    assert "needs a pool" in capsys.readouterr().err


def test_the_search_tunes_an_attack_with_images_on_its_pool(tmp_path):
    pytest.importorskip("optuna")
    from megex.experiments import tuning as tune

    config = bench_config(tmp_path, **POOL, **PLAIN)
    out = tmp_path / "tuning"
    _untrained_victims(out, [100])
    parser = add_tune_arguments(argparse.ArgumentParser())
    argv = ["--config", config, "--out", str(out), "--trials", "1", "--budget", "60",
            "--marks", "20", "60", "--methods", "knockoff-maps"]  # fmt: skip
    doc = tune.run_search(parser.parse_args(argv))
    assert doc["search"]["marks"] == [20, 60]
    searched = doc["methods"]["knockoff-maps"]
    assert {"clone_lr", "batch_size", "loss", "explanation_loss"} <= set(searched)
    assert "generator_lr" not in searched
    with pytest.raises(ValueError, match="--marks: 100 is past"):
        tune.run_search(parser.parse_args([*argv[:-5], "--marks", "100", "--methods", "jbda"]))
