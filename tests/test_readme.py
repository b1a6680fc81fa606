"""Every command and Python example in the README runs as written."""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def megex_commands() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("megex "):
                lines.append(line)
    return lines


def test_readme_has_the_quick_start_and_commands():
    quick = blocks("bash")[0].split()
    assert quick == ["make", "demo", "make", "test"]
    assert any("class MyNet" in block for block in blocks("python"))
    names = {cmd.split()[1] for cmd in megex_commands()}
    assert {"train-victim", "attack", "eval", "report", "serve"} <= names


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def test_readme_commands_run_as_written(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    megex = [sys.executable, "-m", "megex"]
    background = []
    try:
        for line in megex_commands():
            args = shlex.split(line.rstrip("&").strip())
            if args[1] in ("bench", "tune", "tradeoff", "detection"):
                # Hours (minutes for detection) at full scale: their options must parse here;
                # they run at toy scale in test_bench.py, test_tradeoff.py and
                # test_detection_bench.py.
                from megex.cli import build_parser

                assert build_parser().parse_args(args[1:]).command == args[1]
                continue
            if line.endswith("&"):
                proc = subprocess.Popen(
                    megex + args[1:],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                background.append(proc)
                port = args[args.index("--port") + 1]
                wait_for(f"http://127.0.0.1:{port}/v2/health/ready")
                continue
            quiet = ["--quiet"] if args[1] in ("attack", "train-victim") else []
            done = subprocess.run(
                megex + args[1:] + quiet, cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    finally:
        for proc in background:
            proc.terminate()
            proc.wait(timeout=30)
    assert (tmp_path / "victims" / "digits.json").is_file()
    for run in ("megex", "dfme", "remote"):
        assert (tmp_path / "runs" / run / "result.json").is_file()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| megex |" in report and "| dfme |" in report


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys, index):
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    block = blocks("python")[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()
    if "class MyNet" in block:  # the Python API's first example
        assert "torch.Size([4, 10]) torch.Size([4, 10, 1, 8, 8]) 4" in out
        assert "megex 1" in out and "exact (all classes)" in out
