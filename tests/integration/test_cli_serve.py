"""`megex serve`: one-line errors, the options it builds the app from, the ready line."""

from __future__ import annotations

import json
import select
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from server_support import images, save_tiny_victim  # noqa: E402

from megex import Explanation  # noqa: E402
from megex.cli import build_parser, main  # noqa: E402
from megex.cli.serve import build_app, run_serve  # noqa: E402

NAME = "model"
KEY = "serve-key"


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["serve", "--victim", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("megex serve: error: victim: no file") and "\n" not in err
    path = save_tiny_victim(tmp_path)
    (tmp_path / "empty.txt").write_text("# no keys\n")
    for argv, status, message in [
        (["--defense", "blur:3"], 2, "--defense: defense: unknown 'blur'"),
        (["--keys", str(tmp_path / "nokeys.txt")], 1, "--keys: [Errno 2]"),
        (["--keys", str(tmp_path / "empty.txt")], 2, "holds no keys"),
        (["--budget", "-1"], 2, "--budget: expected >= 0"),
        (["--prediction", "top-k"], 2, "top_k"),
    ]:
        db = str(tmp_path / "l.sqlite")
        assert main(["serve", "--victim", str(path), "--db", db, *argv]) == status, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    for argv, message in [
        (["--port", "70000"], "expected a port in 0..65535"),
        (["--explanation-target", "everything"], "expected 'predicted', 'all' or a class index"),
        (["--explanation-target", "-1"], "expected 'predicted', 'all' or a class index"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--victim", str(path), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_options_build_the_app(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nalpha,100\nbeta\n")
    args = build_parser().parse_args(
        ["serve", "--victim", str(save_tiny_victim(tmp_path)), "--keys", str(keys),
         "--key", "gamma", "--budget", "50", "--db", str(tmp_path / "l.sqlite"),
         "--fixed-explanation", "--explanation-method", "smoothgrad", "--defense", "round:2",
         "--prediction", "top-k", "--top-k", "3", "--port", "9999"]
    )  # fmt: skip
    assert args.func is run_serve and args.port == 9999
    app, parsed_keys = build_app(args)
    assert parsed_keys == {"alpha": 100, "beta": None, "gamma": None}
    service = app.state.service
    assert service.name == NAME and service.responder.prediction == "top-k"
    assert service.responder.explanation == Explanation("smoothgrad")
    assert not service.responder.allow_explanation_choice
    ledger = app.state.ledger
    assert ledger.usage(ledger.authenticate("alpha").id).budget == 100
    assert ledger.usage(ledger.authenticate("beta").id).budget == 50


def test_serve_prints_one_ready_line_on_stdout(tmp_path):
    argv = ["serve", "--victim", str(save_tiny_victim(tmp_path)), "--port", "0", "--key", KEY]
    argv += ["--db", str(tmp_path / "l.sqlite"), "--log-level", "info"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "megex", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "no ready line within 60 s"
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["model"] == NAME
        assert ready["address"].startswith("http://127.0.0.1:")
        assert not ready["address"].endswith(":0")
        assert ready["url"] == f"{ready['address']}/v2/models/{NAME}"
        r = httpx.post(
            f"{ready['address']}/v1/models/{NAME}:predict",
            json={"instances": images(1).tolist()},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["X-Queries-Used"] == "1"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert out == ""  # the ready line was all: the access log goes to stderr
    assert f"model '{NAME}'" in err and "POST /v1/models" in err


def test_serve_module_reports_a_missing_victim():
    done = subprocess.run(
        [sys.executable, "-m", "megex", "serve", "--victim", "/nonexistent/v.safetensors"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "no file" in done.stderr


def test_the_options_are_the_service_settings(tmp_path):
    from megex.cli import UsageError
    from megex.cli.serve import service_settings
    from megex.cli.service_options import SETTING_OPTIONS, read
    from megex.serving import ServiceSettings

    argv = ["serve", "--victim", "v.safetensors"]
    # Unset, every option gives its setting's default (written once, on the dataclass).
    defaults, args = ServiceSettings(), build_parser().parse_args(argv)
    for option in SETTING_OPTIONS:
        assert option.read(args) == getattr(defaults, option.setting), option.flag
    args = build_parser().parse_args(
        [*argv, "--max-body-mb", "2", "--rate-limit", "3", "--top-k", "4", "--openapi"]
    )
    settings = service_settings(args, (1, 8, 8))
    assert settings.max_body_bytes == 2 * 1024 * 1024 and settings.rate_limit == 3.0
    assert settings.top_k == 4 and settings.openapi and settings.db_path == "megex-ledger.sqlite"
    # A refusal names the option and states the rule in the option's own unit.
    for extra, message in [
        (["--max-body-mb", "0"], "--max-body-mb: expected >= 9.53674e-07, got 0.0"),
        (["--failed-key-rate", "0"], "--failed-key-rate: expected > 0, got 0.0"),
        (["--name", "a:b"], "--name: 'a:b' cannot appear in a URL path segment"),
    ]:
        with pytest.raises(UsageError) as info:
            read(build_parser().parse_args([*argv, *extra]))
        assert str(info.value) == message
