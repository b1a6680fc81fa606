"""The sweep runner: local processes, and a real Ray instance (2 CPUs) started here."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from bench_support import bench_config as _config  # the benchmark's small digits config

from megex.cli.bench import add_bench_arguments, add_tune_arguments
from megex.experiments import query_efficiency as bench
from megex.experiments import sweep
from megex.experiments import tuning as tune
from megex.experiments.runner import run_one
from megex.experiments.tuning import trials
from megex.models import build_classifier
from megex.runs import read_metrics
from megex.victim import Victim

ray = pytest.importorskip("ray")

# Runs here share 2 cores with Ray's workers: one thread each.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (its start-up is most of these tests' time).
    The sweep finds it connected, uses it and leaves it open."""
    # Ray lowers its workers' priority (nice 15); beside the other test worker they would
    # wait for CPU most of the time, so here they keep the tests' own priority.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        _system_config={"worker_niceness": 0},
    )
    # The test module's own job functions travel by value (workers cannot import tests/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _victim(out: Path, seed: int = 0) -> None:
    """An untrained victim at the benchmark's cache path (training is tested elsewhere)."""
    torch.manual_seed(0)
    victim = Victim(
        build_classifier("small_cnn", 10, 1, 8), (1, 8, 8), 10, arch="small_cnn", dataset="digits"
    )
    victim.accuracy = 0.5
    victim.save(out / "victims" / f"digits-small_cnn-seed{seed}-val200.safetensors")


def _args(tmp_path: Path, out: str, *extra: str) -> argparse.Namespace:
    _victim(tmp_path / out)
    argv = [
        "--config", _config(tmp_path), "--quick", "--out", str(tmp_path / out),
        "--victim-seeds", "0", "--no-progress", "--no-plot", *extra,
    ]  # fmt: skip
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


def _jobs(tmp_path: Path, out: str, *extra: str) -> list[dict]:
    args = _args(tmp_path, out, *extra)
    config = bench.load_config(args.config)
    victim = tmp_path / out / "victims" / "digits-small_cnn-seed0-val200.safetensors"
    return bench.plan(config, args, tmp_path / out, {0: victim})


def _untimed(stats: dict) -> dict:
    """The summary's figures without wall times (which differ from run to run)."""
    if not isinstance(stats, dict):
        return stats
    return {k: _untimed(v) for k, v in stats.items() if k != "elapsed_s"}


def _rows(run_dir: str | Path) -> list[dict]:
    """A run's evaluations without their wall times."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_a_sweep_on_ray_gives_the_local_runners_results(tmp_path, ray_instance, capfd):
    common = ("--seeds", "0", "--methods", "megex-all", "dfme")
    local = bench.run_benchmark(_args(tmp_path, "local", *common))
    on_ray = bench.run_benchmark(_args(tmp_path, "ray", *common, "--ray"))
    assert _untimed(on_ray["stats"]) == _untimed(local["stats"])
    assert on_ray["queries_to_reach"] == local["queries_to_reach"]
    assert "Ray" in on_ray["runner"] and "local processes" in local["runner"]
    for name in ("megex-all-v0-s0", "dfme-v0-s0"):
        rows = _rows(tmp_path / "ray" / "runs-quick" / name)
        assert len(rows) == 4 and rows == _rows(tmp_path / "local" / "runs-quick" / name)
    # The same tables, from the same code.
    assert (tmp_path / "ray" / "query_efficiency_quick.md").is_file()
    assert "as Ray tasks" in capfd.readouterr().err
    # --fresh starts the runs over (once, by the driver), to the same figures.
    again = bench.run_benchmark(_args(tmp_path, "ray", *common, "--ray", "--fresh"))
    assert _untimed(again["stats"]) == _untimed(local["stats"])
    assert "already done" not in capfd.readouterr().err


def _killed_after_first_checkpoint(job: dict) -> dict:
    """run_one, but the first attempt's worker process is killed (SIGKILL) as soon as
    the run's first checkpoint is on disk; each attempt notes its pid and what it found."""
    folder = Path(job["run_dir"])
    log = folder.with_name(folder.name + ".attempts")
    log.parent.mkdir(parents=True, exist_ok=True)
    first = not log.is_file()
    with log.open("a") as f:
        f.write(f"{os.getpid()} {(folder / 'checkpoint.pt').is_file()}\n")
    if first:

        def kill_at_checkpoint() -> None:
            while not (folder / "checkpoint.pt").is_file():
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_at_checkpoint, daemon=True).start()
    return run_one(job)


def test_a_worker_killed_mid_run_is_retried_and_resumed(tmp_path, ray_instance):
    [job] = _jobs(tmp_path, "out", "--seeds", "0", "--methods", "dfme")
    reference = run_one({**job, "run_dir": str(tmp_path / "reference")})
    results: list[dict] = []
    failures = sweep.run_jobs(
        [job], None, results.append, _killed_after_first_checkpoint, ray="local", retries=2
    )
    assert failures == [] and len(results) == 1 and not results[0]["skipped"]
    attempts = (tmp_path / "out" / "runs-quick" / "dfme-v0-s0.attempts").read_text().split()
    # Two processes: the first started afresh and was killed, the second found its checkpoint.
    assert len(attempts) == 4 and attempts[0] != attempts[2]
    assert attempts[1] == "False" and attempts[3] == "True"
    assert _rows(job["run_dir"]) == _rows(tmp_path / "reference")
    assert results[0]["metrics"][-1]["clone_accuracy"] == reference["metrics"][-1]["clone_accuracy"]


def test_an_interrupted_sweep_redoes_no_finished_run(tmp_path, ray_instance):
    jobs = _jobs(tmp_path, "out", "--seeds", "0", "1", "--methods", "megex-all", "dfme")

    def interrupt(result: dict) -> None:
        raise KeyboardInterrupt  # Ctrl-C as the first run finishes

    with pytest.raises(KeyboardInterrupt):
        sweep.run_jobs(jobs, None, interrupt, run_one, ray="local")
    finished = {j["run_dir"]: Path(j["run_dir"], "result.json").stat().st_mtime_ns
                for j in jobs if Path(j["run_dir"], "result.json").is_file()}  # fmt: skip
    assert 1 <= len(finished) < len(jobs)
    results: list[dict] = []
    assert sweep.run_jobs(jobs, None, results.append, run_one, ray="local") == []
    assert len(results) == len(jobs)
    for res in results:
        assert res["skipped"] == (res["run_dir"] in finished)
    for run_dir, mtime in finished.items():
        assert Path(run_dir, "result.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("runner", ["this process", "local processes", "ray"])
def test_a_run_with_bad_settings_is_reported_once_and_the_others_finish(
    tmp_path, runner, capfd, request
):
    jobs = _jobs(tmp_path, "out", "--seeds", "0", "--methods", "megex-all", "dfme")
    if runner == "ray":
        request.getfixturevalue("ray_instance")
    bad = {**jobs[1], "settings": {**jobs[1]["settings"], "clone_lr": -1.0}}
    jobs = [jobs[0], bad]
    workers, on = {"this process": (1, None), "local processes": (2, None)}.get(
        runner, (None, "local")
    )
    results: list[dict] = []
    failures = sweep.run_jobs(jobs, workers, results.append, run_one, ray=on)
    assert [r["method"] for r in results] == ["megex-all"]
    [failure] = failures
    assert failure.job["name"] == "dfme victim 0 seed 0" and failure.kind == "SettingError"
    assert failure.settings and "clone_lr: expected a number > 0" in failure.message
    err = capfd.readouterr().err
    assert err.count("dfme victim 0 seed 0 failed: SettingError: clone_lr") == 1
    assert sweep.SweepFailed(failures, 2).settings_only


def test_the_search_on_ray_shares_one_study_per_method(tmp_path, ray_instance):
    pytest.importorskip("optuna")
    import optuna

    _victim(tmp_path / "tuning", seed=tune.SEARCH["victim_seed"])
    argv = [
        "--config", _config(tmp_path), "--out", str(tmp_path / "tuning"), "--trials", "3",
        "--budget", "300", "--methods", "dfme", "--parallel-trials", "2", "--ray",
    ]  # fmt: skip
    doc = tune.run_search(add_tune_arguments(argparse.ArgumentParser()).parse_args(argv))
    assert doc["trials"]["dfme"] == 4  # 3 searched and the published settings' trial
    study = optuna.load_study(study_name="dfme", storage=doc["study"])
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # Two workers on one study: at most one trial beyond the four that are judged.
    assert 4 <= len(complete) <= 5


def test_the_settings_file_names_its_study_without_machine_paths_or_passwords(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    inside = f"sqlite:///{tmp_path / 'tuning' / 'studies.db'}"
    assert trials.portable_url(inside) == "sqlite:///tuning/studies.db"
    assert (
        trials.portable_url("sqlite:////elsewhere/studies.db") == "sqlite:////elsewhere/studies.db"
    )
    assert trials.portable_url("postgresql://user:secret@db/optuna") == "postgresql://db/optuna"


def test_ray_stays_optional_and_bad_options_are_one_line(monkeypatch):
    from megex.cli import build_parser

    for line, address in (
        ("bench --quick --ray", "local"),
        ("bench --ray auto --jobs 4", "auto"),
        ("tune --ray --jobs 2", "local"),
    ):
        args = build_parser().parse_args(line.split())
        assert args.ray == address, line
    for line in ("bench --jobs 0", "bench --retries -1", "tune --parallel-trials two"):
        with pytest.raises(SystemExit):  # argparse's one-line message, exit status 2
            build_parser().parse_args(line.split())
    from megex.experiments.sweep.ray_tasks import ClusterError, _reachable

    with pytest.raises(ClusterError, match="--ray 127.0.0.1:1: nothing answers there"):
        _reachable("127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'megex\[ray\]'"):
        sweep.run_jobs([{}], None, print, len, ray="local")
    with pytest.raises(ValueError, match="--jobs: 0 runs at once"):
        sweep.run_jobs([{}], 0, print, len)
    with pytest.raises(ValueError, match="--storage: 'studies.db' is not a database URL"):
        trials.storage_url(argparse.Namespace(storage="studies.db", out="x"))
