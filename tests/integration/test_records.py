"""Run records (megex.experiments.records, `megex records`): byte-identical round trips of
real and hand-made run folders, refusals to overwrite or drop runs, reuse by the benchmark,
a rebuild from the records alone, and the command line's errors; the detection benchmark's
and the gradient alignment's own records, and the tables rebuilt from them."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from bench_support import SMALL_SETTINGS

from megex.cli import main as megex_main
from megex.experiments import gradient_alignment, records
from megex.experiments import query_efficiency as bench
from megex.experiments.detection import report as detection_report
from megex.experiments.detection import scores as detection_scores
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


def test_pack_out_of_an_experiment_folder_that_holds_others_packs_it_alone(tmp_path, capsys):
    # A benchmark's root folder keeps its own runs and other experiments' folders below it.
    root = tmp_path / "results"
    _hand_made(root)
    _hand_made(root / "nested")
    out = tmp_path / "root.jsonl.gz"
    assert megex_main(["records", "pack", str(root), "--out", str(out)]) == 0
    assert len(records.read_records(out)) == 2
    assert not (root / "nested" / records.RECORDS).exists()
    # A folder above both is not one experiment: --out stays refused there.
    assert megex_main(["records", "pack", str(tmp_path), "--out", str(out)]) == 2
    assert "holds 2 experiment folders" in capsys.readouterr().err


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


# --- the detection benchmark's and the gradient alignment's own records --------------------


def _detection_root(tmp_path: Path, digits_victim) -> tuple[Path, list[str]]:
    """A folder laid out as the repository's, with a toy detection config and its victim,
    and the quick detection command that writes benchmarks/results/detection there."""
    root = tmp_path / "root"
    config = root / "benchmarks" / "configs" / "detection.json"
    config.parent.mkdir(parents=True)
    doc = {
        "dataset": "digits",
        "validation_images": 300,
        "settings": SMALL_SETTINGS,
        "methods": ["megex-all", "dfme"],
        "monitors": {"prada": {}, "ood": {"window": 50}},
        "target_fpr": 0.2,
        "quick_queries": 250,
        "quick_seeds": [0],
        "quick_streams": 3,
    }
    config.write_text(json.dumps(doc))
    victims = root / "benchmarks" / "results" / "victims"
    digits_victim.save(victims / "digits-small_cnn-seed0-val300.safetensors")
    argv = [
        "detection", "--quick", "--config", "benchmarks/configs/detection.json",
        "--out", "benchmarks/results/detection", "--victims", "benchmarks/results/victims",
    ]  # fmt: skip
    return root, argv


def _outputs(folder: Path, suffixes: tuple[str, ...] = (".json", ".md", ".png")) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.suffix in suffixes
    }


def test_detection_keeps_its_scores_and_rebuilds_its_tables_from_them(
    tmp_path, digits_victim, monkeypatch, capsys
):
    root, argv = _detection_root(tmp_path, digits_victim)
    monkeypatch.chdir(root)
    assert megex_main(argv) == 0
    out = root / "benchmarks" / "results" / "detection"
    made = _outputs(out)
    assert set(made) == {
        "detection_quick.json", "detection_quick.md",
        "calibration/prada-digits-small_cnn-seed0.json",
        "calibration/ood-digits-small_cnn-seed0.json",
    }  # fmt: skip
    path = out / detection_scores.SCORES
    kept = path.read_bytes()
    assert kept[4:8] == b"\0\0\0\0"  # gzip with no time: the same run, the same bytes
    rows = records.read_lines(path)
    assert [r["record"] for r in rows] == ["benchmark"] + ["calibration"] * 2 + ["attack"] * 2 + [
        "benign"
    ] * 9
    summary = json.loads(made["detection_quick.json"])
    assert [r["run"] for r in rows if r["record"] == "attack"] == summary["attack_runs"]
    # The table reads the same from the JSON (sorted keys) as from the run: the run's order.
    assert detection_report.markdown(summary).encode() == made["detection_quick.md"]
    assert "| prada | megex-all |" in made["detection_quick.md"].decode().split("| any |")[0]
    # Every table and calibration file again from the scores alone, byte for byte.
    for name in made:
        (out / name).unlink()
    assert megex_main(["detection", "--quick", "--from-records", "--out", str(out)]) == 0
    assert _outputs(out) == made
    assert path.read_bytes() == kept
    # The rebuild runs the same command, in a copy, and finds the same tables.
    manifest = root / "rebuild.json"
    step = {
        "name": "detection-quick",
        "command": ["detection", "--quick", "--from-records", "--out", str(out.relative_to(root))],
        "outputs": [f"benchmarks/results/detection/{n}" for n in sorted(made)],
    }
    manifest.write_text(json.dumps({"copy": ["benchmarks"], "steps": [step]}))
    capsys.readouterr()
    assert megex_main(["records", "rebuild", "--manifest", str(manifest)]) == 0
    verdicts = capsys.readouterr().out
    assert verdicts.count(": identical") == 4, verdicts
    # The full run's scores go beside the quick run's, in the same file; each rebuilds alone.
    record = detection_scores.read(out, "detection_quick")
    record.benchmark["queries"] = 999
    detection_scores.write(out, "detection", record)
    assert detection_scores.read(out, "detection_quick").benchmark["queries"] == 250
    assert megex_main(["detection", "--from-records", "--out", str(out)]) == 0
    assert json.loads((out / "detection.json").read_text())["queries"] == 999
    assert _outputs(out)["detection_quick.json"] == made["detection_quick.json"]


def test_detection_from_records_refuses_run_options_and_missing_records(
    tmp_path, digits_victim, monkeypatch, capsys
):
    out = tmp_path / "out"
    for extra, status, words in [
        (["--seeds", "1"], 2, ["--seeds:", "takes only --out and --quick"]),
        (["--config", "x.json"], 2, ["--config:"]),
        ([], 1, [str(out / detection_scores.SCORES), "no detection records"]),
    ]:
        assert megex_main(["detection", "--from-records", "--out", str(out), *extra]) == status
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    out.mkdir()
    records.write_lines(out / detection_scores.SCORES, [{"something": "else"}])
    assert megex_main(["detection", "--from-records", "--out", str(out)]) == 2
    assert "line 1: not a detection record" in capsys.readouterr().err
    # A run refuses, before it starts, a records file it could not add its scores to.
    root, argv = _detection_root(tmp_path, digits_victim)
    monkeypatch.chdir(root)
    assert megex_main([*argv[:-4], "--out", str(out), *argv[-2:]]) == 2
    assert "line 1: not a detection record" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [detection_scores.SCORES]


def _aligned_victim(root: Path) -> None:
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 10, 1, 14), (1, 14, 14), 10, arch="lenet5")
    victim.dataset, victim.accuracy = "fashion-mnist-14", 0.5
    victim.eval().save(
        root / "14" / "victims" / "fashion-mnist-14-lenet5-seed0-val5000.safetensors"
    )


def test_gradient_alignment_keeps_its_measurements_and_rebuilds_from_them(
    tmp_path, fashion_mnist, capsys
):
    torch.set_num_threads(1)
    _aligned_victim(tmp_path / "dims")
    out = tmp_path / "alignment"
    argv = [
        "gradient-alignment", "--sizes", "14", "--victims-root", str(tmp_path / "dims"),
        "--batches", "3", "--batch-size", "8", "--directions", "10", "1",
        "--train-queries", "600", "--out", str(out),
    ]  # fmt: skip
    assert megex_main(argv) == 0
    made = _outputs(out)
    assert set(made) == {
        "gradient_alignment.json",
        "gradient_alignment.md",
        "gradient_alignment.png",
    }
    path = out / gradient_alignment.MEASUREMENTS
    kept = path.read_bytes()
    rows = records.read_lines(path)
    assert [r["record"] for r in rows] == ["settings", "size"]
    phases = rows[1]["size"]["phases"]
    assert [p["phase"] for p in phases] == ["initial", "trained"]
    assert [d["m"] for d in phases[0]["directions"]] == [1, 10]  # the order measured
    assert all(len(d["cosines"]) == 3 for p in phases for d in p["directions"])
    # The summary's statistics are the record's measurements summarised.
    summary = json.loads(made["gradient_alignment.json"])
    trained = summary["sizes"][0]["phases"]["trained"]
    assert trained["m"]["10"]["batches"] == phases[1]["directions"][1]["cosines"]
    assert trained["queries"] == phases[1]["queries"] > 0
    for name in made:
        (out / name).unlink()
    assert megex_main(["gradient-alignment", "--from-records", "--out", str(out)]) == 0
    assert _outputs(out) == made  # the plot's bytes too
    assert path.read_bytes() == kept
    # It measures nothing, so it takes no measuring option; without records it says so.
    assert (
        megex_main(["gradient-alignment", "--from-records", "--out", str(out), "--batches", "2"])
        == 2
    )
    assert "--batches: --from-records measures nothing" in capsys.readouterr().err
    assert megex_main(["gradient-alignment", "--from-records", "--out", str(tmp_path)]) == 1
    assert "no measurements" in capsys.readouterr().err


def test_a_rebuild_step_gathers_run_folders_before_it_runs(made, tmp_path, capsys):
    # The unconfirmed 28x28 table's layout: runs kept in two folders of one experiment, read
    # together by one benchmark in another folder.
    root = _copy(made, tmp_path)
    results = root / "benchmarks" / "results"
    (results / "runs-other").mkdir()
    shutil.move(results / "runs-quick" / "dfme-v0-s0", results / "runs-other" / "dfme-v0-s0")
    records.pack(results)
    shutil.rmtree(results / "runs-quick"), shutil.rmtree(results / "runs-other")
    elsewhere = "benchmarks/results/gathered"
    (root / elsewhere).mkdir()
    shutil.copy(root / f"{STEM}.json", root / elsewhere / "query_efficiency_quick.json")
    command = [*BENCH[:5], elsewhere, *BENCH[6:]]
    step = {
        "name": "gathered",
        "command": command,
        "outputs": [f"{elsewhere}/query_efficiency_quick.json"],
        "gather": [
            {"from": "benchmarks/results/runs-quick", "to": f"{elsewhere}/runs-quick"},
            {"from": "benchmarks/results/runs-other", "to": f"{elsewhere}/runs-quick"},
            {"from": "benchmarks/results/victims", "to": f"{elsewhere}/victims"},
        ],
    }
    manifest = root / "rebuild.json"
    manifest.write_text(json.dumps({"copy": ["benchmarks"], "steps": [step]}))
    argv = ["records", "rebuild", "--root", str(root), "--manifest", str(manifest)]
    assert megex_main(argv) == 0
    out = capsys.readouterr().out
    assert "query_efficiency_quick.json: identical" in out or "wall time only" in out, out
    step["gather"] = step["gather"][:1]  # without the other folder's run: refused
    manifest.write_text(json.dumps({"copy": ["benchmarks"], "steps": [step]}))
    assert megex_main(argv) == 1
    assert "would be run" in capsys.readouterr().out
    step["gather"] = [{"from": "benchmarks/results/runs-quick"}]
    manifest.write_text(json.dumps({"copy": ["benchmarks"], "steps": [step]}))
    assert megex_main(argv) == 2
    assert "gather: expected a list of" in capsys.readouterr().err


def test_victim_file_names_the_victim_the_experiment_caches():
    # Held-out pool images are in the name: a rebuild must find the pool victims it reads.
    config = {"dataset": "fashion-mnist", "validation_images": 5000, "pool_images": 10000}
    path = records.victim_file(Path("victims"), config, 1)
    assert path.name == "fashion-mnist-lenet5-seed1-val5000-pool10000.safetensors"
    assert (
        records.victim_file(Path("v"), {"dataset": "digits"}, 0).name
        == "digits-small_cnn-seed0.safetensors"
    )
