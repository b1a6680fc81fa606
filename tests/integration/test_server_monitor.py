"""Query monitors in the HTTP service: real clients over a loopback port, flags in the
ledger, `megex serve --monitor` and `megex flags`."""

from __future__ import annotations

import json
import logging
import sqlite3

import httpx
import pytest
import torch

from megex import LocalOracle, data, run
from megex.attacks import DFME
from megex.defenses import RoundProbabilities
from megex.detection import Calibration, OODMonitor, PradaMonitor
from megex.oracle import Responder

pytest.importorskip("fastapi")
pytest.importorskip("scipy")

from server_support import ServerThread, save_tiny_victim  # noqa: E402

from megex.cli import build_parser, main  # noqa: E402
from megex.client import RemoteOracle  # noqa: E402
from megex.serving import create_app  # noqa: E402
from megex.sqlite_ledger import SQLiteLedger, flag_report  # noqa: E402

torch.set_num_threads(1)

ATTACKER, READER, NOISY = "attacker-key", "reader-key", "noise-key"
# PRADA's lower end of the paper's range; an OOD threshold far above what real digits give
# this victim (their 1 - max probability averages under 0.05 over 100 queries).
PRADA_THRESHOLD, OOD_THRESHOLD = 0.9, 0.15


def test_generator_traffic_is_flagged_and_real_images_are_not(tmp_path, digits_victim, capsys):
    db = tmp_path / "ledger.sqlite"
    monitors = [PradaMonitor(threshold=PRADA_THRESHOLD), OODMonitor(threshold=OOD_THRESHOLD)]
    app = create_app(digits_victim, keys=[ATTACKER, READER, NOISY], db_path=db, monitors=monitors)
    x_test, _ = data.load("digits").test_tensors()
    with ServerThread(app) as server:
        # A data-free attacker: DFME's generator queries and their probes.
        with RemoteOracle(server.url, ATTACKER) as remote:
            attack = DFME(batch_size=16, nz=16, ngf=8, clone_steps=1, seed=0)
            run(attack, remote, 500, progress=False)
        # A client with real images, in random order.
        with RemoteOracle(server.url, READER) as remote:
            order = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))
            for batch in x_test[order].split(40):
                remote.query(batch, explanation=True)
        # A client sending uniform noise.
        with RemoteOracle(server.url, NOISY) as remote:
            noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
            for batch in noise.split(50):
                remote.query(batch)
        app.state.monitors.flush(timeout=60)
        ledger = app.state.ledger
        flags = {
            key: ledger.flag_rows(ledger.authenticate(key).id) for key in (ATTACKER, READER, NOISY)
        }
        assert flags[READER] == []
        # One flag per monitor at most: a statistic wavering about a threshold is one flag.
        by_monitor = {row[1]: row for row in flags[ATTACKER]}
        assert "prada" in by_monitor and len(flags[ATTACKER]) == len(by_monitor)
        _, _, statistic, threshold, seen = by_monitor["prada"]
        assert statistic < threshold == PRADA_THRESHOLD and 100 <= seen <= 500
        assert [row[1] for row in flags[NOISY]] == ["ood"]
        assert flags[NOISY][0][2] > OOD_THRESHOLD and flags[NOISY][0][4] == 100
        # The report reads the ledger while the server holds it.
        assert main(["flags", "--db", str(db), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["accounts"] == 3 and len(report["flagged"]) == 2
        by_label = {entry["label"]: entry for entry in report["flagged"]}
        attacker = by_label[ledger.authenticate(ATTACKER).label]
        assert attacker["flags"] == len(by_monitor) and attacker["by_monitor"]["prada"] == 1
        first = min(flags[ATTACKER], key=lambda row: row[0])
        assert attacker["first"]["monitor"] == first[1] and attacker["queries_used"] >= 400
        assert main(["flags", "--db", str(db)]) == 0
        text = capsys.readouterr().out
        assert "2 of 3 key(s) flagged" in text and "prada" in text and "ood 1" in text


class Broken(OODMonitor):
    name = "broken"

    def _update(self, state, images, probs):
        raise RuntimeError("monitor bug")


def test_a_failing_monitor_is_logged_and_the_request_still_answered(tmp_path, caplog):
    from server_support import images, tiny_victim

    app = create_app(tiny_victim(), keys=[READER], monitors=[Broken(0.5), OODMonitor(0.0)])
    with ServerThread(app) as server, RemoteOracle(server.url, READER) as remote:
        with caplog.at_level(logging.WARNING, logger="megex.server"):
            answer = remote.query(images(120))
            app.state.monitors.flush(timeout=30)
        assert answer.probabilities.shape == (120, 10)
        assert "monitor broken failed" in caplog.text and "monitor bug" in caplog.text
        # The monitor beside it went on: an OOD threshold of 0 flags any window.
        rows = app.state.ledger.flag_rows()
        assert [r[1] for r in rows] == ["ood"] and "monitor ood flagged" in caplog.text


def test_the_monitors_see_honest_probabilities_whatever_the_service_returns(digits_victim):
    x, _ = data.load("digits").test_tensors()
    x = x[:30]
    honest = torch.softmax(digits_victim(x), 1)
    for settings in ({"defenses": [RoundProbabilities(1)]}, {"prediction": "label"}):
        responder = Responder(digits_victim, **settings)
        answer, probabilities = responder.answer_with_probabilities(x, None)
        assert not torch.allclose(answer.probabilities, honest, atol=1e-4)
        torch.testing.assert_close(probabilities, honest)
        assert torch.equal(responder.answer(x, None).probabilities, answer.probabilities)
    # One chunk at a time gives the same as one whole.
    chunked = Responder(digits_victim, batch_size=7)
    torch.testing.assert_close(chunked.answer_with_probabilities(x, None)[1], honest)
    assert LocalOracle(digits_victim).query(x).probabilities.shape == (30, 10)


def test_a_ledger_written_before_flags_opens_and_reports_none(tmp_path, capsys):
    db = tmp_path / "old.sqlite"
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, "
        "label TEXT NOT NULL, budget INTEGER, used INTEGER NOT NULL DEFAULT 0, "
        "active INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL);"
        "INSERT INTO accounts(key_hash, label, budget, used, created) "
        "VALUES ('h', 'key-old', 10, 3, 0);"
    )
    old.close()
    assert flag_report(db) == {"ledger": str(db), "accounts": 1, "flagged": []}
    assert main(["flags", "--db", str(db)]) == 0
    assert "0 of 1 key(s) flagged" in capsys.readouterr().out
    ledger = SQLiteLedger(db, keys=["k"])
    try:
        account = ledger.authenticate("k")
        ledger.record_flags(account.id, [OODFlag()])
        assert ledger.flag_rows(account.id) == [(5.0, "ood", 0.5, 0.2, 100)]
        report = flag_report(db)
        assert report["accounts"] == 2 and report["flagged"][0]["first"]["statistic"] == 0.5
    finally:
        ledger.close()


class OODFlag:
    monitor, statistic, threshold, queries_seen, time = "ood", 0.5, 0.2, 100, 5.0


def test_monitor_options_are_checked_before_anything_starts(tmp_path, capsys):
    victim = str(save_tiny_victim(tmp_path))
    wrong_shape = Calibration(
        "ood", {"score": "msp", "window": 10}, 0.2, 0.05, 10, 500, 0.0,
        about={"input_shape": [1, 28, 28]},
    ).save(tmp_path / "ood.json")  # fmt: skip
    for monitor, status, message in [
        ("ood", 2, "--monitor ood: ood has no default threshold"),
        ("prada:window=5", 2, "--monitor prada:window=5: monitor 'prada': unknown parameter"),
        (f"ood:calibration={wrong_shape}", 2, "calibrated on images of shape (1, 28, 28)"),
        (f"ood:calibration={tmp_path / 'none.json'}", 1, "No such file"),
        ("entropy", 2, "unknown 'entropy'"),
    ]:
        argv = ["serve", "--victim", victim, "--db", str(tmp_path / "l.sqlite")]
        assert main([*argv, "--monitor", monitor]) == status, monitor
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    argv = ["serve", "--victim", victim, "--db", str(tmp_path / "l.sqlite")]
    argv += ["--monitor", "prada", "--monitor", "prada:seed=1"]
    assert main(argv) == 2
    assert "each kind at most once" in capsys.readouterr().err
    assert main(["flags", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert "--db: no ledger at" in capsys.readouterr().err
    (tmp_path / "text.sqlite").write_text("not a database")
    assert main(["flags", "--db", str(tmp_path / "text.sqlite")]) == 2
    assert "not a readable megex ledger" in capsys.readouterr().err


def test_serve_builds_the_monitors_it_is_given(tmp_path):
    from megex.cli.serve import build_app

    calibration = Calibration(
        "ood", {"score": "entropy", "window": 20}, 0.3, 0.05, 10, 500, 0.0,
        about={"input_shape": [1, 8, 8]},
    ).save(tmp_path / "ood.json")  # fmt: skip
    args = build_parser().parse_args(
        ["serve", "--victim", str(save_tiny_victim(tmp_path)), "--db", str(tmp_path / "l.db"),
         "--monitor", "prada:threshold=0.93,projection_dim=32",
         "--monitor", f"ood:calibration={calibration}"]
    )  # fmt: skip
    app, _ = build_app(args)
    try:
        prada, ood = app.state.monitors.monitors
        assert (prada.threshold, prada.projection_dim) == (0.93, 32)
        assert (ood.threshold, ood.score, ood.window) == (0.3, "entropy", 20)
    finally:
        app.state.monitors.close()
        app.state.ledger.close()
    # Without monitors the service has none.
    plain = create_app(LocalOracle(app.state.service.responder.victim))
    assert plain.state.monitors is None
    plain.state.ledger.close()


def test_flags_the_ledger_cannot_record_are_logged_and_the_answer_stands(caplog):
    from server_support import images, tiny_victim

    app = create_app(tiny_victim(), keys=[READER], monitors=[OODMonitor(0.0, window=1)])

    def refuse(*args):
        raise sqlite3.OperationalError("disk I/O error")

    app.state.ledger.record_flags = refuse
    with ServerThread(app) as server, caplog.at_level(logging.WARNING, logger="megex.server"):
        r = httpx.post(
            f"{server.url}/v1/models/model:predict",
            json={"instances": images(2).tolist()},
            headers={"x-api-key": READER},
            timeout=30,
        )
        app.state.monitors.flush(timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert "recording 1 flag(s) of account" in caplog.text and "disk I/O error" in caplog.text


def test_the_queue_for_the_monitors_is_ordered_and_bounded():
    import time

    from megex.serving.monitoring import MonitorHub

    seen = []

    class Slow(OODMonitor):
        name = "slow"

        def _update(self, state, images, probs):
            time.sleep(0.02)
            seen.append((len(images), hub._pending_bytes))
            return []

    ledger = SQLiteLedger()
    hub = MonitorHub([Slow(0.5)], ledger, max_pending_bytes=2048)  # 8 images of 8x8 floats
    try:
        sizes = [4, 4, 4, 4, 8, 12]  # the last is larger than the cap: it waits for none
        for n in sizes:
            hub.submit(1, torch.rand(n, 1, 8, 8), torch.full((n, 10), 0.1))
        hub.flush(timeout=30)
    finally:
        hub.close()
        ledger.close()
    assert [n for n, _ in seen] == sizes
    assert max(pending for n, pending in seen if n <= 8) <= 2048
    assert seen[-1] == (12, 12 * 64 * 4)
