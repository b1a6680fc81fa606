"""The `megex` command: exit statuses (0 done, 1 refused or failed, 2 usage, 130 interrupted),
one-line errors and tracebacks for bugs, --json, --version, help on every option."""

import argparse
import json
import subprocess
import sys

import pytest

from megex.cli import build_parser, main
from megex.cli.common import shows_default
from megex.cli.errors import exit_status


@pytest.fixture
def victim_file(tmp_path, digits_victim):
    return str(digits_victim.save(tmp_path / "victim.safetensors"))


def attack_argv(victim_file, out, *extra):
    return ["attack", "--victim", victim_file, "--out", str(out), "--quiet", *extra]


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


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
def test_missing_files_are_one_line_failures(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"megex {argv[0]}: error: ") and message in err and one_line(err)


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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "100"], "--budget: 100 queries is less than one iteration of megex"),
        (["--budget", "1000", "--defense", "blur:3"], "--defense: defense: unknown 'blur'"),
        (["--budget", "1000", "--prediction", "top-k"], "top_k: expected 1..10"),
        (["--budget", "1000", "--dataset", "fashion-mnist"], "--dataset: fashion-mnist images"),
    ],
)
def test_usage_mistakes_are_one_line_errors(tmp_path, victim_file, request, capsys, extra, message):
    if "fashion-mnist" in extra:
        request.getfixturevalue("fashion_mnist")  # skipped where it is not installed
    assert main(attack_argv(victim_file, tmp_path / "r", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and one_line(err)


def test_any_attack_setting_can_be_set(tmp_path, victim_file, capsys):
    out = tmp_path / "run"
    argv = attack_argv(victim_file, out, "--budget", "2000", "--batch-size", "32")
    argv += ["--set", "replay_policy=ring", "--set", "query_gamma=[1, 1]"]
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
    assert main(attack_argv(victim_file, out, "--budget", "2000", "--set", setting)) == 2
    err = capsys.readouterr().err
    assert message in err and one_line(err)
    assert not (out / "result.json").exists()


def test_attack_refuses_to_overwrite_and_resumes(tmp_path, victim_file, capsys):
    out = str(tmp_path / "run")
    argv = attack_argv(victim_file, out, "--budget", "3000", "--batch-size", "64")
    argv += ["--defense", "round:3", "--explanation-output", "log_probability"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["queries_used"] <= 3000 and result["clone_accuracy"] is not None
    assert result["details"]["explanation"]["output"] == "log_probability"
    assert main(argv) == 2 and "already holds a finished run" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0 and "nothing to resume" in capsys.readouterr().out
    assert main(argv + ["--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries_used"] == result["queries_used"]
    assert main(argv + ["--force"]) == 0
    (tmp_path / "run" / "clone.json").unlink()  # the weights file describes itself
    assert main(["eval", out, "--victim", victim_file]) == 0
    evaluation = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert evaluation["clone_accuracy"] == pytest.approx(result["clone_accuracy"])
    assert evaluation["fidelity"] == pytest.approx(result["fidelity"])


def interrupt_clone_steps_after(monkeypatch, steps: int) -> None:
    """Make the attack loop see Ctrl-C after `steps` clone updates (undo() lifts it)."""
    from megex.attacks.base import Attack

    clone_step = Attack.clone_step
    calls = []

    def interrupted(self, oracle):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return clone_step(self, oracle)

    monkeypatch.setattr(Attack, "clone_step", interrupted)


def test_interrupted_attack_says_so_on_stderr_and_resumes(
    tmp_path, victim_file, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = attack_argv(victim_file, out, "--budget", "2560", "--batch-size", "64", "--json")
    argv += ["--eval-every", "256"]
    interrupt_clone_steps_after(monkeypatch, 10)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and "megex attack: interrupted after" in captured.err
    assert "--resume" in captured.err
    monkeypatch.undo()
    changed = argv + ["--resume", "--set", "replay_size=50"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "--resume: the run in" in err and "replay_size" in err and one_line(err)
    assert main(argv + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"] == 20


def test_a_run_behind_a_defense_resumes_only_behind_it(tmp_path, victim_file, monkeypatch, capsys):
    argv = attack_argv(victim_file, tmp_path / "run", "--budget", "2560", "--batch-size", "64")
    argv += ["--eval-every", "256", "--json"]
    interrupt_clone_steps_after(monkeypatch, 3)
    assert main(argv + ["--defense", "sign"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "defenses" in err and "sign" in err and "none now" in err and one_line(err)
    assert main(argv + ["--defense", "sign", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"] == 20


def test_json_output_of_train_attack_eval_and_report(tmp_path, capsys):
    victim = tmp_path / "victims" / "digits.safetensors"
    argv = ["train-victim", "--dataset", "digits", "--epochs", "2", "--out", str(victim)]
    assert main(argv + ["--quiet", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["path"] == str(victim) and trained["arch"] == "small_cnn"
    assert trained["sidecar"] == str(victim.with_suffix(".json")) and 0 < trained["accuracy"] <= 1
    run = tmp_path / "runs" / "dfme"
    argv = attack_argv(str(victim), run, "--method", "dfme", "--budget", "1000", "--json")
    assert main(argv + ["--batch-size", "32"]) == 0
    attacked = json.loads(capsys.readouterr().out)
    assert attacked["run"] == str(run) and attacked["method"] == "dfme"
    assert attacked == {"run": str(run), **json.loads((run / "result.json").read_text())}
    assert main(["eval", str(run), "--victim", str(victim), "--json"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n") == 1
    assert json.loads(text)["fidelity"] == pytest.approx(attacked["fidelity"])
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["report"] == str(tmp_path / "report" / "report.md")
    assert [r["label"] for r in report["runs"]] == ["dfme"]


def test_demo_prints_the_table_and_where_output_went(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "2000", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Victim accuracy:" in text
    for label in ("megex", "megex-predicted", "dfme"):
        assert f"| {label} |" in text
        assert (out / "digits" / label / "result.json").is_file()
    assert f"report: {out / 'digits' / 'report.md'}" in text
    assert (out / "digits" / "accuracy.png").stat().st_size > 1000
    summary = json.loads((out / "digits" / "report.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["megex", "megex-predicted", "dfme"]
    assert all(r["queries"] <= 2000 and r["curve"] for r in summary["runs"])
    # The second demo reuses the cached victim; with --json, prose goes to stderr. (A small
    # budget: the attacks themselves were checked above.)
    assert main(["demo", "--budget", "1000", "--out", str(out), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert "test accuracy" in captured.err and "training" not in captured.err
    document = json.loads(captured.out)
    assert [r["label"] for r in document["runs"]] == ["megex", "megex-predicted", "dfme"]
    assert document["budget"] == 1000 and document["plot"].endswith("accuracy.png")
    assert all(r["queries"] <= 1000 for r in document["runs"])


def test_unreachable_service_is_a_one_line_failure(tmp_path, capsys):
    argv = ["attack", "--victim", "http://127.0.0.1:9/v2/models/x", "--budget", "1000"]
    assert main(argv + ["--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert one_line(capsys.readouterr().err)


def test_a_budget_refused_by_the_service_is_a_one_line_failure(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import httpx
    from server_support import ServerThread, images, tiny_victim

    from megex.client import RemoteOracle
    from megex.serving import create_app

    query = RemoteOracle.query

    def after_another_client(self, x, explanation=None):
        # Another client of the same key spends what is left in the meantime.
        body = {"instances": images(self.remaining - 10).tolist()}
        auth = {"Authorization": "Bearer k"}
        httpx.post(f"{self.root}/v1/models/{self.name}:predict", json=body, headers=auth)
        return query(self, x, explanation)

    monkeypatch.setattr(RemoteOracle, "query", after_another_client)
    with ServerThread(create_app(tiny_victim(), keys={"k": 400})) as server:
        argv = attack_argv(server.url, tmp_path / "r", "--api-key", "k", "--budget", "400")
        assert main(argv + ["--batch-size", "32"]) == 1
    err = capsys.readouterr().err
    assert "megex attack: error: query budget exceeded" in err and one_line(err)


@pytest.mark.parametrize("error", ["RuntimeError", "ValueError"])
def test_a_bug_shows_its_traceback(tmp_path, error):
    code = (
        "import sys, megex.victim\n"
        "def bug(*args, **kwargs):\n"
        f"    raise {error}('a bug in training')\n"
        "megex.victim.train_victim = bug\n"
        "from megex.cli import main\n"
        "sys.exit(main(['train-victim', '--dataset', 'digits', '--out', 'v', '--quiet']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and f"{error}: a bug in training" in done.stderr


def test_the_exit_status_map():
    from megex import BudgetExceeded, ExplanationNotOffered
    from megex.cli import UsageError

    assert exit_status(UsageError("--x: no")) == 2
    assert exit_status(BudgetExceeded(10, 5, 100)) == 1
    assert exit_status(ExplanationNotOffered("no")) == 1
    assert exit_status(FileNotFoundError("no file")) == 1
    assert exit_status(ModuleNotFoundError("no fastapi", name="fastapi")) == 1
    assert exit_status(KeyboardInterrupt()) == 130
    for bug in (ValueError("x"), RuntimeError("x"), KeyError("x"), TypeError("x")):
        assert exit_status(bug) is None
    assert exit_status(ModuleNotFoundError("no module", name="megex.nothing")) is None


def test_version(capsys):
    from megex import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"megex {__version__}\n"
    done = subprocess.run(
        [sys.executable, "-m", "megex", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == f"megex {__version__}\n"


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{parser.prog} {choice.dest}: no help"
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_with_its_default():
    commands = set()
    for parser in _parsers(build_parser()):
        commands.add(parser.prog)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{parser.prog} {name}: no help"
            if action.option_strings and shows_default(action):
                shown = formatter._get_help_string(action)
                assert "(default" in shown, f"{parser.prog} {name}: default not shown"
    assert {f"megex {c}" for c in ("train-victim", "attack", "eval", "report", "demo")} < commands
    assert {"megex serve", "megex bench"} < commands
