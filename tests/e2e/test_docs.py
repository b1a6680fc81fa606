"""Every command in the README and the docs runs as written (the Python examples:
test_docs_python.py, so that both run at once)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from docs_support import (
    FORWARDS_TO_BENCH,
    PAGES,
    QUIET,
    README,
    ROOT,
    blocks,
    command,
    megex_lines,
    parse_only_lines,
    runnable_lines,
)


def test_readme_has_the_quick_start_and_commands():
    quick = blocks("bash")[0].split()
    assert quick == ["make", "demo", "make", "test"]
    assert any("class MyNet" in block for block in blocks("python"))
    names = {command(line) for line in megex_lines([README])}
    assert {"train-victim", "attack", "report", "serve"} <= names
    # The README answers and points on; the docs hold the rest.
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", ["README.md", "benchmarks/RESULTS.md"])
def test_links_outside_the_docs_point_at_files_that_exist(page):
    # The pages under docs/ are checked by `mkdocs build --strict`; these two are not in it.
    path = ROOT / page
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link.split("#")[0] for link in links if "://" not in link]
    assert any("docs/" in link for link in local)
    for link in local:
        assert (path.parent / link).is_file(), link


def test_docs_cover_every_command():
    from megex.cli import build_parser

    named = {command(line) for line in megex_lines(PAGES)}
    assert set(subcommands(build_parser())) <= named


def test_service_page_states_the_limits_and_the_crash_semantics():
    from megex.cli import build_parser

    page = (ROOT / "docs" / "service.md").read_text()
    serve = subcommands(build_parser())["serve"]
    title = "limits against costly or hostile clients"
    groups = [g for g in serve._action_groups if g.title == title]
    flags = [a.option_strings[0] for g in groups for a in g._group_actions]
    assert len(flags) >= 10
    flags += ["--max-body-mb", "--rate-limit", "--openapi", "--expose-architecture"]
    for flag in flags:
        assert f"`{flag}" in page, flag
    assert "kill -9" in page and "Idempotency-Key" in page


def subcommands(parser) -> dict:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


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


# The documented attacks at 10,000 queries take about 15 s each on 2 cores; what is checked
# here (each command runs, writes its run folder, the report has both rows) does not depend
# on the budget, so the suite runs them at this one instead (a named substitution).
DOCUMENTED_BUDGET, TEST_BUDGET = "10000", "3000"


def as_tested(args: list[str]) -> list[str]:
    """A documented command's arguments with an attack's DOCUMENTED_BUDGET as TEST_BUDGET."""
    if args[1] == "attack" and "--budget" in args:
        at = args.index("--budget") + 1
        if args[at] == DOCUMENTED_BUDGET:
            return [*args[:at], TEST_BUDGET, *args[at + 1 :]]
    return args


def _cache_the_trained_victim_for_the_demo(folder: Path) -> None:
    """A named substitution: the demo finds in its cache the victim that the docs'
    `megex train-victim --dataset digits` trained (the same seeded recipe, seed 0, nothing
    held out, so a second training would give the same weights), as on a user's second
    run of the demo; the demo's own training is test_cli.py's."""
    from megex.cli.common import cache_dir
    from megex.recipes import cached_victim_path

    cached = cached_victim_path(cache_dir() / "victims", "digits", None, 0, 0)
    cached.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(folder / "victims" / f"digits{suffix}", cached.with_suffix(suffix))


def test_doc_commands_run_as_written(tmp_path, monkeypatch, capsys):
    # The servers run as the docs start them, in their own processes; every other command
    # runs through the CLI's entry point in this process (the arguments as written; `python
    # -m megex` itself: test_cli.py), which spares each one starting Python and torch again.
    import torch

    from megex.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # (the demo's cache is the test's own: conftest.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    assert any(f"--budget {DOCUMENTED_BUDGET} " in line for line in runnable_lines())
    background = []
    try:
        for line in runnable_lines():
            args = as_tested(shlex.split(line.rstrip("&").strip()))
            if line.endswith("&"):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "megex", *args[1:]],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                background.append(proc)
                port = args[args.index("--port") + 1]
                wait_for(f"http://127.0.0.1:{port}/v2/health/ready")
                continue
            if args[1] == "demo":
                _cache_the_trained_victim_for_the_demo(tmp_path)
            quiet = ["--quiet"] if args[1] in QUIET else []
            try:
                status = main(args[1:] + quiet)
            except SystemExit as exit:  # argparse refusing an option
                status = exit.code
            said = capsys.readouterr()
            assert status == 0, f"{line}\n{said.out}\n{said.err}"
            if args[1] == "attack":
                out = args[args.index("--out") + 1]
                assert (tmp_path / out / "result.json").is_file(), line
    finally:
        torch.set_num_threads(threads)
        for proc in background:
            proc.terminate()
            proc.wait(timeout=30)
    assert (tmp_path / "victims" / "digits.json").is_file()
    for run in ("megex", "dfme", "remote"):
        assert (tmp_path / "runs" / run / "result.json").is_file()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| megex |" in report and "| dfme |" in report


@pytest.mark.parametrize("line", parse_only_lines())
def test_long_running_commands_parse(line):
    from megex.cli import build_parser

    parser = build_parser()
    args = shlex.split(line)[1:]
    try:
        parsed, unknown = parser.parse_known_args(args)
        if unknown and args[0] in FORWARDS_TO_BENCH:
            # megex input-size passes the options it does not know to megex bench.
            parser.parse_args(["bench", *unknown])
            unknown = []
    except SystemExit:
        pytest.fail(f"the options of `{line}` do not parse")
    assert not unknown, f"`{line}`: unrecognized arguments {unknown}"
    assert parsed.command == args[0]
