"""The ledger file under a running server: one server per file whatever its name, stored
responses within their caps and given back when they expire, and what a crash leaves
charged, over a real uvicorn server (or `megex serve` in a process) on a loopback port."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")

from server_support import (  # noqa: E402
    ServerThread,
    images,
    save_tiny_victim,
    tiny_victim,
    wait_until_ready,
)

from megex.serving import create_app  # noqa: E402
from megex.sqlite_ledger import LedgerInUse, SQLiteLedger  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
KEY = "ledger-file-key"
V1E = f"/v1/models/{NAME}:explain"
ALL_CLASSES = {"target": "all"}


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


def _file_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


def test_a_symlink_does_not_bypass_the_one_server_lock(victim, tmp_path):
    db = tmp_path / "real" / "ledger.sqlite"
    link = tmp_path / "link.sqlite"
    app = create_app(victim, name=NAME, keys={KEY: 100}, db_path=db)
    responder = app.state.service.responder
    real_answer, computing, finish = responder.answer, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        computing.set()
        finish.wait(10)
        return real_answer(*args, **kwargs)

    responder.answer = held
    body = {"instances": images(4).tolist()}
    headers = {"x-api-key": KEY, "Idempotency-Key": "in-flight"}
    with ServerThread(app) as s:
        replies = []
        thread = threading.Thread(
            target=lambda: replies.append(httpx.post(s.url + V1E, json=body, headers=headers))
        )
        thread.start()
        assert computing.wait(10)
        link.symlink_to(db)
        for other_name in (link, tmp_path / "real" / ".." / "real" / "ledger.sqlite"):
            with pytest.raises(LedgerInUse, match="already in use"):
                create_app(victim, keys={KEY: 100}, db_path=other_name)
        finish.set()
        thread.join()
        # The request in flight kept its charge, and its retry is a replay, not a new charge.
        again = httpx.post(s.url + V1E, json=body, headers=headers)
        assert replies[0].status_code == again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert s.app.state.ledger.total_used() == 4


def test_stored_responses_are_capped_expire_and_give_their_space_back(victim, tmp_path):
    db = tmp_path / "ledger.sqlite"
    body = {"instances": images(24).tolist(), "parameters": ALL_CLASSES}
    with ServerThread(create_app(victim, keys=[KEY], db_path=tmp_path / "probe.sqlite")) as s:
        size = len(httpx.post(s.url + V1E, json=body, headers={"x-api-key": KEY}).content)
    app = create_app(
        victim,
        keys={"a": None, "b": None},
        db_path=db,
        stored_response_bytes_per_key=int(2.5 * size),
        stored_response_bytes=int(3.5 * size),
        idempotency_ttl_s=1.5,
    )
    ledger = app.state.ledger

    def send(key: str, idem: str, request: dict = body) -> httpx.Response:
        headers = {"x-api-key": key, "Idempotency-Key": idem}
        return http.post(V1E, json=request, headers=headers)

    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        first = [send("a", f"a{i}") for i in range(4)]
        a, b = ledger.authenticate("a").id, ledger.authenticate("b").id
        assert ledger.stored_bytes(a) == 2 * size  # within 2.5 responses: the newest two
        send("b", "b0"), send("b", "b1")
        assert ledger.stored_bytes() == 3 * size  # within 3.5: the oldest of all went
        assert ledger.stored_bytes(a) == size and ledger.stored_bytes(b) == 2 * size
        used = ledger.total_used()
        # A retry whose response was dropped is refused, not charged again; a kept one is
        # replayed.
        gone = send("a", "a2")
        assert gone.status_code == 410 and gone.json()["code"] == "response_not_kept"
        kept = send("a", "a3")
        assert kept.content == first[3].content and kept.headers["Idempotent-Replayed"]
        # A response larger than the per-key cap is given but not kept.
        large = {"instances": images(64).tolist(), "parameters": ALL_CLASSES}
        assert send("a", "large", large).status_code == 200
        last_stored = time.monotonic()
        assert send("a", "large", large).status_code == 410
        assert ledger.total_used() == used + 64
        peak = _file_bytes(db)
        assert peak > 3 * size
        # Past their time to live, stored responses are deleted and their space given back.
        time.sleep(max(0.0, 1.5 - (time.monotonic() - last_stored)) + 0.1)
        assert http.post(V1E, json={"instances": images(1).tolist()}, headers={"x-api-key": "b"})
        assert ledger.stored_bytes() == 0
        assert _file_bytes(db) < peak / 4, (peak, _file_bytes(db))
        assert send("a", "a3").status_code == 200  # expired: a new request, charged anew
        assert ledger.total_used() == used + 64 + 1 + 24


def test_a_crash_leaves_charged_only_the_requests_sent_without_an_idempotency_key(tmp_path):
    """The semantics the README states next to the Idempotency-Key: after `kill -9`, a
    request that was charged and never answered stays charged, unless it was sent with an
    Idempotency-Key, which the next server refunds so that its retry is charged once."""
    db = tmp_path / "ledger.sqlite"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "megex", "serve", "--victim", str(save_tiny_victim(tmp_path)),
         "--port", str(port), "--key", KEY, "--db", str(db), "--log-level", "warning",
         "--name", NAME],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}{V1E}"
    slow = {"method": "integrated_gradients", "stepCount": 256, "target": "all"}
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server, seconds=60)
        deadline = time.monotonic() + 60

        def send(n: int, headers: dict) -> None:
            body = {"instances": images(n).tolist(), "parameters": slow}
            try:
                httpx.post(url, json=body, headers={"x-api-key": KEY, **headers}, timeout=60)
            except httpx.TransportError:
                pass  # the server was killed

        clients = [
            threading.Thread(target=send, args=(40, {"Idempotency-Key": "retry-me"})),
            threading.Thread(target=send, args=(24, {})),
        ]
        for client in clients:
            client.start()
        reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        while reader.execute("SELECT COUNT(*) FROM audit").fetchone()[0] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        reader.close()
        server.kill()  # as kill -9: nothing is refunded on the way down
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
    for client in clients:
        client.join()
    ledger = SQLiteLedger(db, keys={KEY: None})
    try:
        account = ledger.authenticate(KEY).id
        assert ledger.usage(account).used == 24
        assert sorted((count, refunded) for _, _, count, refunded in ledger.audit_rows()) == [
            (24, 0),
            (40, 1),
        ]
    finally:
        ledger.close()


def test_the_service_page_states_the_limits_and_the_crash_semantics():
    import argparse

    from megex.cli.serve import add_parser

    page = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    section = page.split("## Limits", 1)[1]
    commands = argparse.ArgumentParser().add_subparsers()
    add_parser(commands)
    title = "limits against costly or hostile clients"
    groups = [g for g in commands.choices["serve"]._action_groups if g.title == title]
    flags = [a.option_strings[0] for g in groups for a in g._group_actions]
    assert len(flags) >= 10
    for flag in [*flags, "--budget"]:
        assert f"`{flag}" in section, flag
    for flag in ("--openapi", "--expose-architecture", "--db", "--keys"):
        assert f"`{flag}" in page, flag
    assert "kill -9" in section and "Idempotency-Key" in section
