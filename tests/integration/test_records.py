"""Run records (megex.experiments.records, `megex records`): byte-identical round trips of
real and hand-made run folders, refusals to overwrite or drop runs, reuse by the benchmark,
a rebuild from the records alone, and the command line's errors."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest

from megex.cli import main as megex_main
from megex.experiments import query_efficiency as bench
from megex.experiments import records
from megex.models import build_classifier
from megex.runs import RunFolder
from megex.victim import Victim

# A tiny benchmark on digits: two methods, one untrained victim, one seed, 600 queries.
SETTINGS = {
    "batch_size": 16,
    "nz": 16,
    "ngf": 8,
    "clone_steps": 2,
    "lr_schedule": "constant",
    "clone_updates_per_1k_queries": 80.0,
}
BENCH = [
    "bench", "--config", "benchmarks/configs/digits.json", "--quick", "--out",
    "benchmarks/results", "--victim-seeds", "0", "--seeds", "0", "--methods", "megex-all",
    "dfme", "--no-progress", "--no-plot",
]  # fmt: skip
STEM = "benchmarks/results/query_efficiency_quick"


def _in_root(root: Path, argv: list[str]) -> list[str]:
    """A benchmark command line with its paths under `root` (as run from `root`)."""
    return [str(root / a) if a.startswith("benchmarks/") else a for a in argv]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A folder laid out as the repository's: a config, a victim, and the finished runs and
    tables of a real benchmark under benchmarks/results."""
    root = tmp_path_factory.mktemp("root")
    config = root / "benchmarks" / "configs" / "digits.json"
    config.parent.mkdir(parents=True)
    doc = {
        "dataset": "digits",
        "validation_images": 200,
        "settings": SETTINGS,
        "quick_budgets": [300, 600],
        "eval_at": [100, 200],
        "tuned_settings": None,
    }
    config.write_text(json.dumps(doc))
    victim = Victim(
        build_classifier("small_cnn", 10, 1, 8), (1, 8, 8), 10, arch="small_cnn", dataset="digits"
    )
    victim.accuracy = 0.5
    out = root / "benchmarks" / "results"
    path = records.victim_file(out / "victims", bench.load_config(config), 0)
    victim.save(path)
    assert megex_main(_in_root(root, BENCH)) == 0
    # Tabled again from the finished runs, as a table rebuilt from records is: a run's wall
    # time is its run's own (result.json) when reused, the worker's when run.
    assert megex_main(_in_root(root, BENCH)) == 0
    return root


def _kept(folder: Path) -> dict[str, bytes]:
    """The bytes of every file a record keeps, by path relative to `folder`."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.name in records.KEPT
    }


def _copy(made: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(made, root)
    return root


def test_a_real_runs_records_unpack_byte_for_byte_without_weights(made, tmp_path):
    results = _copy(made, tmp_path) / "benchmarks" / "results"
    runs = results / "runs-quick"
    assert {p.name for p in runs.iterdir()} == {"megex-all-v0-s0", "dfme-v0-s0"}
    assert (runs / "dfme-v0-s0" / "clone.safetensors").is_file()
    path, count = records.pack(results)
    assert (path, count) == (results / records.RECORDS, 2)
    held = records.read_records(path)
    assert [r["name"] for r in held] == ["runs-quick/dfme-v0-s0", "runs-quick/megex-all-v0-s0"]
    assert all(set(r) == {"name", "config", "metrics", "result"} for r in held)
    written, present = records.unpack(path, tmp_path / "elsewhere")
    assert (len(written), present) == (2, [])
    assert _kept(tmp_path / "elsewhere") == _kept(results)
    for run in written:  # the three files, never the clone or its description
        assert sorted(p.name for p in run.iterdir()) == sorted(records.KEPT)
    # Packed again, the same bytes; the gzip header holds no time.
    first = path.read_bytes()
    records.pack(results)
    assert path.read_bytes() == first
    assert first[4:8] == b"\0\0\0\0"


def test_unpacked_runs_are_reused_by_the_benchmark(made, tmp_path, capsys):
    root = _copy(made, tmp_path)
    results = root / "benchmarks" / "results"
    path, _ = records.pack(results)
    before = _kept(results)
    summary = json.loads((root / f"{STEM}.json").read_text())
    shutil.rmtree(results / "runs-quick")
    records.unpack(path)
    capsys.readouterr()
    assert megex_main(_in_root(root, BENCH)) == 0
    assert capsys.readouterr().err.count("(already done)") == 2
    assert _kept(results) == before
    again = json.loads((root / f"{STEM}.json").read_text())
    summary.pop("wall_s"), again.pop("wall_s")
    assert again == summary


def _hand_made(experiment: Path) -> None:
    """Two run folders written through RunFolder, with values a round trip can trip on."""
    odd = {
        "text": 'é ü \u2603 "quoted" \\ back',
        "tiny": 1e-300,
        "sum": 0.1 + 0.2,
        "big": 2**62,
        "neg_zero": -0.0,
        "nan": math.nan,
        "inf": math.inf,
        "nested": {"b": [1, 2.5, None, True], "a": {}},
    }
    full = RunFolder(experiment / "runs" / "odd-v0-s0").create()
    # config.json and result.json are written with default=str: a path becomes a string.
    full.write_config({"method": "hand", "path": Path("/a/b"), **odd})
    full.write_metrics([{"queries": 10, "clone_accuracy": 0.5, **odd}, {"queries": 20}])
    full.write_result({"finished": True, "metrics": [], "path": Path("/c"), **odd})
    (full.path / "clone.safetensors").write_bytes(b"weights")
    (full.path / "checkpoint.pt").write_bytes(b"state")
    bare = RunFolder(experiment / "runs-other" / "bare").create()
    bare.write_config({})
    bare.write_result({"finished": True})  # no metrics.jsonl at all
    RunFolder(experiment / "runs" / "unfinished").create().write_metrics([{"queries": 1}])
    (experiment / "runs" / "unfinished" / "config.json").write_text("{}\n")


def test_hand_made_run_folders_round_trip_and_unfinished_ones_stay_out(tmp_path):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    path, count = records.pack(experiment)
    assert count == 2
    records.unpack(path, tmp_path / "copy")
    assert _kept(tmp_path / "copy") == {
        k: v for k, v in _kept(experiment).items() if not k.startswith("runs/unfinished/")
    }
    assert not (tmp_path / "copy" / "runs-other" / "bare" / "metrics.jsonl").exists()
    assert not (tmp_path / "copy" / "runs" / "unfinished").exists()
    assert records.check(experiment) == []


def test_a_file_not_written_as_a_run_writes_it_is_not_packed(tmp_path, capsys):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    config = experiment / "runs" / "odd-v0-s0" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=4))
    with pytest.raises(ValueError, match="not in the form a run writes it"):
        records.pack(experiment)
    assert megex_main(["records", "pack", str(experiment)]) == 2
    assert str(config) in capsys.readouterr().err
    assert not (experiment / records.RECORDS).exists()


def test_unpack_refuses_to_overwrite_another_run_and_writes_nothing(tmp_path, capsys):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    path, _ = records.pack(experiment)
    into = tmp_path / "into"
    other = RunFolder(into / "runs" / "odd-v0-s0").create()
    other.write_config({"method": "another"})
    with pytest.raises(records.RecordsConflict, match="config.json differ"):
        records.unpack(path, into)
    assert not (into / "runs-other").exists()
    assert megex_main(["records", "unpack", str(path), "--into", str(into)]) == 1
    err = capsys.readouterr().err
    assert "hold other runs, nothing was written" in err and "odd-v0-s0" in err
    assert json.loads(other.config_path.read_text()) == {"method": "another"}
    # An unfinished run of the same name is another run too.
    shutil.rmtree(into)
    (into / "runs" / "odd-v0-s0").mkdir(parents=True)
    (into / "runs" / "odd-v0-s0" / "checkpoint.pt").write_bytes(b"state")
    with pytest.raises(records.RecordsConflict, match="unfinished run"):
        records.unpack(path, into)
    # The same runs already there: nothing to write, no refusal.
    written, present = records.unpack(path, experiment)
    assert (written, len(present)) == ([], 2)


def test_pack_refuses_to_drop_runs_the_file_holds(tmp_path, capsys):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    path, _ = records.pack(experiment)
    first = path.read_bytes()
    shutil.rmtree(experiment / "runs-other")
    assert megex_main(["records", "pack", str(experiment)]) == 1
    assert "runs-other/bare" in capsys.readouterr().err
    assert path.read_bytes() == first
    records.unpack(path)
    assert megex_main(["records", "pack", str(experiment)]) == 0


def test_check_names_each_difference(tmp_path, capsys):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    assert megex_main(["records", "check", str(tmp_path)]) == 1
    assert "2 finished run(s) not packed" in capsys.readouterr().out
    records.pack(experiment)
    assert megex_main(["records", "check", str(tmp_path)]) == 0
    RunFolder(experiment / "runs" / "odd-v0-s0").write_metrics([{"queries": 10}])
    shutil.rmtree(experiment / "runs-other")
    done = RunFolder(experiment / "runs" / "new").create()
    done.write_config({}), done.write_result({})
    assert megex_main(["records", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "runs/odd-v0-s0: metrics.jsonl differ(s)" in out
    assert "runs-other/bare: in" in out and "not unpacked" in out
    assert "runs/new: finished, not in" in out


def test_command_line_errors_name_the_argument(tmp_path, capsys):
    experiment = tmp_path / "exp"
    _hand_made(experiment)
    _hand_made(tmp_path / "exp2")

    def fails(argv: list[str], status: int, *words: str) -> None:
        assert megex_main(["records", *argv]) == status
        err = capsys.readouterr().err
        assert all(w in err for w in words), err

    fails(["unpack", str(tmp_path / "none.jsonl.gz")], 1, "FILE: no file")
    (tmp_path / "plain.gz").write_text("not gzip")
    fails(["unpack", str(tmp_path / "plain.gz")], 2, "FILE:", "not a gzip file")
    (tmp_path / "bad.jsonl.gz").write_bytes(
        gzip.compress(b'{"name": "../x", "config": {}, "metrics": null, "result": {}}\n')
    )
    fails(["unpack", str(tmp_path / "bad.jsonl.gz")], 2, "line 1", "'../x'")
    fails(["pack", str(tmp_path / "empty")], 1, "DIR:", "no such folder")
    (tmp_path / "empty").mkdir()
    fails(["pack", str(tmp_path / "empty")], 2, "DIR: no finished run folder")
    fails(["pack", str(tmp_path), "--out", str(tmp_path / "x.gz")], 2, "--out:", "2 experiment")
    fails(["pack", str(experiment / "runs")], 2, "pass its experiment folder")
    fails(["rebuild", "--manifest", str(tmp_path / "none.json")], 1, "--manifest")
    assert not (tmp_path / "x.gz").exists()


def _manifest(root: Path, command: list[str]) -> Path:
    path = root / "rebuild.json"
    steps = [{"name": "quick", "command": command, "outputs": [f"{STEM}.json", f"{STEM}.md"]}]
    path.write_text(json.dumps({"copy": ["benchmarks"], "steps": steps}))
    return path


def test_rebuild_remakes_the_tables_from_the_records_alone(made, tmp_path, capsys):
    root = _copy(made, tmp_path)
    results = root / "benchmarks" / "results"
    records.pack(results)
    shutil.rmtree(results / "runs-quick")  # a checkout holds the records, not the runs
    argv = ["rebuild", "--root", str(root), "--manifest", str(_manifest(root, BENCH))]
    assert megex_main(["records", *argv, "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert f"{STEM}.json: identical" in out or f"{STEM}.json: wall time only" in out
    assert f"{STEM}.md: identical" in out or f"{STEM}.md: wall time only" in out
    assert (tmp_path / "work" / "benchmarks" / "results" / "runs-quick" / "dfme-v0-s0").is_dir()
    # A table changed by hand is found out, and written again with --write.
    table = root / f"{STEM}.md"
    made_first = table.read_text()
    table.write_text(made_first.replace("megex-all", "megex-any"))
    assert megex_main(["records", *argv, "--write"]) == 1
    assert f"{STEM}.md: differs" in capsys.readouterr().out
    assert "megex-any" not in table.read_text() and "megex-all" in table.read_text()


def test_rebuild_refuses_a_step_that_would_run_an_attack(made, tmp_path, capsys):
    root = _copy(made, tmp_path)
    results = root / "benchmarks" / "results"
    records.pack(results)
    shutil.rmtree(results / "runs-quick")
    more = [*BENCH, "--seeds", "0", "1"]  # seed 1 was never run
    manifest = _manifest(root, more)
    work = tmp_path / "work"
    argv = ["records", "rebuild", "--root", str(root), "--manifest", str(manifest)]
    assert megex_main([*argv, "--work", str(work)]) == 1
    out = capsys.readouterr().out
    assert "not rebuilt" in out and "would be run" in out and "-v0-s1" in out
    assert not (work / "benchmarks" / "results" / "runs-quick" / "dfme-v0-s1").exists()
    assert megex_main([*argv, "--steps", "other"]) == 2
    assert "--steps: unknown ['other']" in capsys.readouterr().err


def test_compare_output_tells_the_wall_time_from_a_real_difference(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"wall_s": 1.0, "stats": {"x": [1, 2]}}))
    b.write_text(json.dumps({"wall_s": 2.0, "stats": {"x": [1, 2]}}))
    assert records.compare_output(a, b)[0] == "wall time only"
    b.write_text(json.dumps({"wall_s": 1.0, "stats": {"x": [1, 3]}}))
    assert records.compare_output(a, b) == ("differs", "1 value(s), e.g. stats.x[1]")
    c, d = tmp_path / "c.md", tmp_path / "d.md"
    c.write_text("| a |\nWall time 3 s\n")
    d.write_text("| a |\nWall time 4 s\n")
    assert records.compare_output(c, d)[0] == "wall time only"
    d.write_text("| b |\nWall time 3 s\n")
    assert records.compare_output(c, d)[0] == "differs"
    assert records.compare_output(c, tmp_path / "none.md")[0] == "missing"
