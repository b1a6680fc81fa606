"""The ledger's SQLite file: its schema, one server per file (an exclusive lock beside it),
and :func:`flag_report`, which reads the flags that query monitors raised without taking
that lock (a running server holds it)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import IO, Any

__all__ = ["SCHEMA", "LedgerInUse", "flag_report", "hold_exclusively"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    budget INTEGER,                      -- NULL: unlimited
    used INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    time REAL NOT NULL,
    endpoint TEXT NOT NULL,
    count INTEGER NOT NULL,
    refunded INTEGER NOT NULL DEFAULT 0,
    images BLOB                          -- float32 little-endian (N, C, H, W), if audited
);
CREATE INDEX IF NOT EXISTS audit_account ON audit(account_id, time);
CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    time REAL NOT NULL,
    monitor TEXT NOT NULL,
    statistic REAL NOT NULL,
    threshold REAL NOT NULL,
    queries_seen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flags_account ON flags(account_id, time);
"""


class LedgerInUse(RuntimeError):
    """Another open SQLiteLedger (another server) holds this database file."""


def hold_exclusively(lock_path: Path, db_path: str) -> IO[str] | None:
    """An open lock file held exclusively, or LedgerInUse. One server per ledger: each one
    refunds, when it starts, the requests it finds charged but unanswered, which would be
    the other server's requests in flight. `lock_path` is named after the database's real
    path (symbolic links resolved), so that every name of the file shares one lock."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: nothing to enforce with
        return None
    handle = open(lock_path, "a")  # noqa: SIM115 - held open for the ledger's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LedgerInUse(
            f"ledger {db_path}: already in use by another server (lock {lock_path}); "
            "run one server per ledger, or give this one another --db"
        ) from None
    return handle


def flag_report(path: str | os.PathLike) -> dict[str, Any]:
    """The flagged accounts of a ledger file, read without taking its lock (a running
    server keeps it): per account its label, queries used, budget, number of flags, flags
    per monitor, first flag (time, monitor, statistic, threshold, queries_seen) and last
    flag's time; and how many accounts the ledger holds. A ledger written before flags
    existed has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "accounts" not in tables:
            raise ValueError(f"{path} is not a megex ledger (it has no accounts table)")
        accounts = int(db.execute("SELECT COUNT(*) FROM accounts").fetchone()[0])
        flagged: dict[int, dict[str, Any]] = {}
        if "flags" in tables:
            rows = db.execute(
                "SELECT f.account_id, a.label, a.active, a.used, a.budget, f.time, f.monitor, "
                "f.statistic, f.threshold, f.queries_seen FROM flags f "
                "JOIN accounts a ON a.id = f.account_id ORDER BY f.time, f.id"
            )
            for account_id, label, active, used, budget, *flag in rows:
                when, monitor, statistic, threshold, seen = flag
                entry = flagged.get(account_id)
                if entry is None:
                    entry = flagged[account_id] = {
                        "account_id": account_id,
                        "label": label,
                        "active": bool(active),
                        "queries_used": int(used),
                        "budget": None if budget is None else int(budget),
                        "flags": 0,
                        "by_monitor": {},
                        "first": {
                            "time": when,
                            "monitor": monitor,
                            "statistic": statistic,
                            "threshold": threshold,
                            "queries_seen": int(seen),
                        },
                    }
                entry["flags"] += 1
                entry["by_monitor"][monitor] = entry["by_monitor"].get(monitor, 0) + 1
                entry["last_time"] = when
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not a readable megex ledger ({err})") from None
    finally:
        db.close()
    return {"ledger": str(path), "accounts": accounts, "flagged": list(flagged.values())}
