"""The `megex` command: mistakes get one clear line and exit status 2; the demo's table."""

import json

import pytest

from megex.cli import main


@pytest.fixture
def victim_file(tmp_path, digits_victim):
    return str(digits_victim.save(tmp_path / "victim.safetensors"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attack", "--victim", "missing.safetensors", "--budget", "1000", "--out", "r"],
         "no file at missing.safetensors"),
        (["train-victim", "--dataset", "mnist", "--data-root", "nowhere", "--out", "v"],
         "missing train-images-idx3-ubyte.gz"),
        (["report", "not-a-run"], "no config.json"),
        (["eval", "not-a-run", "--dataset", "digits"], "no clone at"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0"], "expected a whole number >= 1"),
        (["--budget", "lots"], "expected a whole number"),
        (["--method", "maze"], "invalid choice: 'maze'"),
        (["--explanation-target", "everything"], "expected 'predicted', 'all' or a class index"),
    ],
)
def test_bad_options_are_refused_by_the_parser(tmp_path, victim_file, capsys, extra, message):
    argv = ["attack", "--victim", victim_file, "--budget", "1000", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as info:
        main(argv + extra)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_any_attack_setting_can_be_set(tmp_path, victim_file, capsys):
    out = tmp_path / "run"
    argv = ["attack", "--victim", victim_file, "--budget", "2000", "--out", str(out), "--quiet"]
    argv += ["--batch-size", "32", "--set", "replay_policy=ring", "--set", "query_gamma=[1, 1]"]
    argv += ["--set", "disagreement-until=1000", "--set", "train_on_generator_queries=false"]
    argv += ["--set", "generator_restart_every=500"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["replay_policy"] == "ring" and config["query_gamma"] == [1, 1]
    assert config["disagreement_until"] == 1000 and config["generator_restart_every"] == 500
    assert config["train_on_generator_queries"] is False


@pytest.mark.parametrize(
    "setting, message",
    [
        ("replay_size=1.5", "--set replay_size: expected a whole number, got '1.5'"),
        ("clone_ema=high", "--set clone_ema: expected a number, got 'high'"),
        ("directions=3", "megex has no setting 'directions'; settable: "),
        ("replay_policy=fifo", "replay_policy: expected one of 'reservoir', 'ring', got 'fifo'"),
        ("no-equals-sign", "--set: expected NAME=VALUE"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, victim_file, capsys, setting, message):
    out = tmp_path / "run"
    argv = ["attack", "--victim", victim_file, "--budget", "2000", "--out", str(out), "--quiet"]
    assert main(argv + ["--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "result.json").exists()


def test_budget_smaller_than_one_iteration(tmp_path, victim_file, capsys):
    argv = ["attack", "--victim", victim_file, "--budget", "100", "--out", str(tmp_path / "r")]
    assert main(argv + ["--quiet"]) == 2
    assert "less than one iteration" in capsys.readouterr().err


def test_attack_refuses_to_overwrite_and_resumes(tmp_path, victim_file, capsys):
    out = str(tmp_path / "run")
    argv = ["attack", "--victim", victim_file, "--budget", "3000", "--out", out, "--quiet"]
    argv += ["--batch-size", "64", "--defense", "round:3"]
    argv += ["--explanation-output", "log_probability"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["queries_used"] <= 3000 and result["clone_accuracy"] is not None
    assert result["details"]["explanation"]["output"] == "log_probability"
    assert main(argv) == 2 and "already holds a finished run" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0 and "nothing to resume" in capsys.readouterr().out
    assert main(argv + ["--force"]) == 0
    (tmp_path / "run" / "clone.json").unlink()  # the weights file describes itself
    assert main(["eval", out, "--victim", victim_file]) == 0
    evaluation = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert evaluation["clone_accuracy"] == pytest.approx(result["clone_accuracy"])
    assert 0 <= evaluation["fidelity"] <= 1


def test_demo_prints_the_table_and_where_output_went(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "15000", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Victim accuracy:" in text
    for label in ("megex", "megex-predicted", "dfme"):
        assert f"| {label} |" in text
        assert (out / "digits" / label / "result.json").is_file()
    assert f"report: {out / 'digits' / 'report.md'}" in text
    assert (out / "digits" / "accuracy.png").stat().st_size > 1000
    summary = json.loads((out / "digits" / "report.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["megex", "megex-predicted", "dfme"]
    assert all(r["queries"] <= 15000 and r["curve"] for r in summary["runs"])
    # The second demo reuses the cached victim.
    assert main(["demo", "--budget", "15000", "--out", str(out), "--quiet"]) == 0
    assert "victim: reusing" in capsys.readouterr().out


def test_unreachable_service_is_a_one_line_error(tmp_path, capsys):
    argv = ["attack", "--victim", "http://127.0.0.1:9/v2/models/x", "--budget", "1000"]
    assert main(argv + ["--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
