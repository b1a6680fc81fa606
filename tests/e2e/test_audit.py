"""`megex audit` end to end on a digits victim: its figures are the benchmark's on the same
victim, an interrupted audit resumes, a served victim gives the same figures, and bad input
gets one line (the report's writers and the browser check: test_audit_report*.py)."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megex.cli import main
from megex.experiments.audit.threats import TUNED

KEY = "audit-key"
BUDGETS = [1000, 2500, 5000, 10000]
AUDIT = ["--budget", "10000", "--seeds", "2", "--jobs", "1", "--quiet"]


def _env() -> dict:
    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}


def _megex(*argv: str) -> list[str]:
    return [sys.executable, "-m", "megex", *argv]


BENCH = {
    "dataset": "digits",
    "victim_seeds": [0],
    "seeds": [0, 1],
    "validation_images": 200,
    "budgets": BUDGETS,
    "eval_at": [250, 500],
    "methods": ["dfme", "megex-predicted"],
    "assumption_methods": [],
    "baseline": "dfme",
    "targets": [0.8, 0.9, 0.95],
    "tuned_settings": str(TUNED / "data-free.json"),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark's config with the audit's settings, budgets and seeds, and the victim
    it trains (its cache path), which the audit then audits: (config file, victim file)."""
    from megex.experiments.query_efficiency import load_config
    from megex.experiments.runner import get_victim

    folder = tmp_path_factory.mktemp("bench")
    (folder / "config.json").write_text(json.dumps(BENCH))
    _, victim = get_victim(load_config(folder / "config.json"), folder / "victims", None, 0)
    return folder / "config.json", victim


@pytest.fixture(scope="module")
def audited(bench, tmp_path_factory):
    """An audit of the benchmark's victim, interrupted (SIGINT) after its first finished run
    and resumed by the same command; (its report, the resumed command's stderr)."""
    _, victim = bench
    out = tmp_path_factory.mktemp("audit") / "audit"
    argv = ["audit", "--victim", str(victim), "--out", str(out), *AUDIT]
    argv += ["--defense", "quantize:bits=2"]
    # SIGINT as a terminal sends it: a worker process of the test runner may ignore SIGINT,
    # and an ignored signal stays ignored in its children.
    first = subprocess.Popen(
        _megex(*argv),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("data-free/runs/*/result.json")):
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "no run finished within 300 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted" in err and not (out / "report.json").exists()
    resumed = subprocess.run(_megex(*argv), capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out.resolve() / "report.html")
    return json.loads((out / "report.json").read_text()), resumed.stderr


def _rows(report: dict, key: str = "data-free") -> dict:
    (tm,) = [t for t in report["threat_models"] if t["key"] == key]
    return {row["budget"]: row for row in tm["accuracy"]}


def test_the_audits_figures_are_the_benchmarks_on_the_same_victim(bench, audited, tmp_path, capsys):
    # `megex bench` with the benchmark's own config, on a copy of the audit's runs: it reuses
    # a run only if it holds the very settings the benchmark would run (else it refuses), so
    # the audit ran the benchmark's runs, and its figures must be the benchmark's table's.
    import shutil

    config, victim = bench
    report, _ = audited
    folder = tmp_path / "bench"
    shutil.copytree(Path(report["out"]) / "data-free" / "runs", folder / "runs")
    (folder / "victims").mkdir()
    for part in victim.parent.glob(victim.stem + ".*"):
        shutil.copy(part, folder / "victims" / part.name)
    argv = ["bench", "--config", str(config), "--out", str(folder), "--no-plot", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0
    # Every one of the benchmark's 4 runs was the audit's: none ran again.
    assert capsys.readouterr().err.count("(already done)") == 4
    summary = json.loads((folder / "query_efficiency.json").read_text())
    rows = _rows(report)
    assert sorted(rows) == BUDGETS
    for budget in BUDGETS:
        for side, method in (("baseline", "dfme"), ("attacker", "megex-predicted")):
            stats = summary["stats"][method][str(budget)]
            assert rows[budget][side]["estimate"] == pytest.approx(stats["mean"], abs=1e-9)
            assert rows[budget][side]["low"] == pytest.approx(stats["interval"]["low"], abs=1e-9)
        vs = summary["stats"]["megex-predicted"][str(budget)]["vs_baseline"]
        assert rows[budget]["difference"]["estimate"] == pytest.approx(vs["mean"], abs=1e-9)
    (tm,) = report["threat_models"]
    for row in tm["leakage"]:
        reach = summary["queries_to_reach"][str(row["target"])]["megex-predicted"]
        saved = (
            reach.get("saved_x") or reach.get("saved_x_at_least") or reach.get("saved_x_at_most")
        )
        assert (row["factor"] or {}).get("estimate") == (saved or {}).get("estimate")
    # Both clones learn: far above chance (0.1) at 10k queries.
    assert rows[10000]["baseline"]["estimate"] > 0.5 and rows[10000]["attacker"]["estimate"] > 0.5


def test_an_interrupted_audit_resumes_and_reports_everything(audited):
    report, err = audited
    assert "resuming the audit" in err and "already done" in err
    assert report["victim"]["dataset"] == "digits" and report["victim"]["accuracy"] > 0.9
    assert report["plan"]["calibration"] and report["plan"]["estimated_s"] > 0
    assert report["plan"]["commands"][0].startswith("megex audit --victim ")
    (block,) = report["defenses"]
    (row,) = block["rows"]
    assert row["spec"] == "quantize:bits=2" and row["kind"] == "explanation"
    # A defence of the maps leaves honest users' labels, and DFME's answers, as they were.
    assert row["served_accuracy"] == pytest.approx(report["victim"]["accuracy"], abs=1e-6)
    assert set(row["attackers"]) == {"megex-predicted"} and 0.3 < row["map_cosine"] < 1
    assert row["lead"] is not None and row["verdict"]
    monitors = {(r["monitor"], r["method"]) for r in report["monitors"]["rows"]}
    assert monitors == {(m, a) for m in ("prada", "ood") for a in ("dfme", "megex-predicted")}
    assert report["skipped"] == []
    out = Path(report["out"])
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # the curves and the defences
    assert "## Answer" in (out / "report.md").read_text()


def test_a_served_victim_gives_the_same_figures(bench, audited, tmp_path):
    pytest.importorskip("fastapi")
    _, victim = bench
    report, _ = audited
    log = tmp_path / "serve.log"
    argv = ["serve", "--victim", str(victim), "--port", "0", "--key", KEY, "--budget", "10000000"]
    argv += ["--db", str(tmp_path / "ledger.sqlite")]
    with open(log, "w") as server_log:
        server = subprocess.Popen(
            _megex(*argv), stdout=subprocess.PIPE, stderr=server_log, text=True, env=_env()
        )
    try:
        assert select.select([server.stdout], [], [], 60)[0], "no ready line within 60 s"
        url = json.loads(server.stdout.readline())["url"]
        out = tmp_path / "served"
        served = ["audit", "--victim", url, "--api-key", KEY, "--dataset", "digits"]
        assert main([*served, "--out", str(out), *AUDIT]) == 0
    finally:
        server.terminate()
        server.communicate(timeout=30)
    remote = json.loads((out / "report.json").read_text())
    assert remote["victim"]["accuracy"] == pytest.approx(report["victim"]["accuracy"], abs=1e-6)
    assert "queries" in remote["victim"]["accuracy_source"]
    for budget, row in _rows(remote).items():
        for side in ("baseline", "attacker"):
            assert row[side]["estimate"] == pytest.approx(
                _rows(report)[budget][side]["estimate"], abs=1e-9
            )
    assert {s["part"] for s in remote["skipped"]} == {"defences", "monitors"}
    assert remote["defenses"] is None and remote["monitors"] is None


def test_a_service_without_explanations_reports_what_it_skipped(bench, tmp_path):
    pytest.importorskip("fastapi")
    _, victim = bench
    argv = ["serve", "--victim", str(victim), "--port", "0", "--explanation-method", "none"]
    argv += ["--db", str(tmp_path / "ledger.sqlite")]
    server = subprocess.Popen(
        _megex(*argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env()
    )
    try:
        assert select.select([server.stdout], [], [], 60)[0], "no ready line within 60 s"
        url = json.loads(server.stdout.readline())["url"]
        out = tmp_path / "audit"
        assert main(["audit", "--victim", url, "--dataset", "digits", "--out", str(out)]) == 0
    finally:
        server.terminate()
        server.communicate(timeout=30)
    report = json.loads((out / "report.json").read_text())
    assert report["threat_models"] == [] and report["explanations"]["returned"] is False
    assert [s["part"] for s in report["skipped"]] == ["data-free map attacker"]
    assert "returns no explanations" in report["skipped"][0]["why"]
    assert "No attack was run" in (out / "report.md").read_text()


def _status(argv: list[str]) -> int:
    """main's exit status, or argparse's for an option it refuses."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code)


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--victim", "no-such.safetensors"], 2, "--victim: no victim file at no-such"),
        (["--victim", "http://127.0.0.1:9/v2/models/m", "--dataset", "digits"], 1,
         "--victim: cannot reach http://127.0.0.1:9/"),
        (["--victim", "http://127.0.0.1:9/v2/models/m"], 2, "--dataset: a served victim needs"),
        (["--seeds", "1"], 2, "--seeds: 1; an interval needs at least 2"),
        (["--defense", "quantize:bits=banana"], 2, "--defense: defense 'quantize'"),
        (["--budget", "500"], 2, "--budget: at least 10000 queries"),
        (["--defense", "label-only", "--no-defenses"], 2, "--no-defenses: given with --defense"),
        (["--time-limit", "ten"], 2, "expected a positive duration such as 90s"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_and_writes_nothing(bench, tmp_path, capsys, args, status, message):
    _, victim = bench
    out = tmp_path / "a"
    # The victim first, so that a --victim in args replaces it.
    assert _status(["audit", "--victim", str(victim), "--out", str(out), *args]) == status
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err, err
    assert not (out / "report.json").exists()


def test_a_time_limit_nothing_fits_is_refused_after_the_calibration(bench, tmp_path, capsys):
    _, victim = bench
    out = tmp_path / "a"
    argv = ["audit", "--victim", str(victim), "--out", str(out), *AUDIT, "--time-limit", "5s"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("megex audit: error: --time-limit: the smallest audit (data-free:")
    assert "needs about" in last
    assert not (out / "report.json").exists() and (out / "calibration.json").is_file()


def test_an_audit_folder_holding_other_options_is_refused(audited, capsys):
    report, _ = audited
    _, victim_line = report["plan"]["commands"][0].split("--victim ", 1)
    victim = victim_line.split()[0]
    argv = ["audit", "--victim", victim, "--out", report["out"], *AUDIT, "--no-defenses"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds an audit with other options (defenses)" in err and "--fresh" in err


def test_a_search_on_the_victim_replaces_the_shipped_settings(bench, tmp_path):
    _, victim = bench
    out = tmp_path / "searched"
    argv = ["audit", "--victim", str(victim), "--out", str(out), *AUDIT, "--search", "1"]
    assert main([*argv, "--no-defenses", "--no-monitors"]) == 0
    report = json.loads((out / "report.json").read_text())
    (tm,) = report["threat_models"]
    assert tm["settings_source"].startswith("a search on this victim (megex audit --search)")
    assert "its 200 held-out validation images" in tm["settings_source"]
    tuned = json.loads((out / "search" / "data-free" / "tuned.json").read_text())
    assert tuned["trials"] == {"dfme": 2, "megex-predicted": 2}  # and the published one
    assert tuned["search"]["seeds"] == [100] and tuned["validation_images"] == 200
    # The runs take the searched settings, not the shipped ones.
    for method in ("dfme", "megex-predicted"):
        for key, value in tuned["methods"][method].items():
            assert tm["settings"][method][key] == value
    assert "short search" in " ".join(report["caveats"])


def test_a_search_needs_the_victims_held_out_images(tmp_path, capsys):
    from server_support import save_tiny_victim

    victim = save_tiny_victim(tmp_path)  # holds out no validation images
    argv = ["audit", "--victim", str(victim), "--out", str(tmp_path / "a"), "--search", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megex audit: error: --search: the victim holds out no validation")
    assert not (tmp_path / "a" / "audit.json").exists()
