"""Responses stored for idempotent retries, in the service's SQLite ledger.

A request sent with an ``Idempotency-Key`` is charged once: its row is claimed when it is
charged, holds the response once it is answered, and a retry of the same request (same key,
endpoint and body) gets that response again without being charged. Rows expire after a
time-to-live and are then deleted. Response bodies are kept within a size cap per key and a
cap over all keys: storing a new one drops the oldest bodies past either cap, and a body
larger than the per-key cap is not kept at all. A row whose body was dropped still answers
its retries, with a refusal that charges nothing, until it expires: a request is never
charged twice. The space of deleted rows and dropped bodies goes back to the file system
(SQLite's incremental vacuum).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_IDEMPOTENCY_TTL_S",
    "DEFAULT_STORED_RESPONSE_BYTES",
    "DEFAULT_STORED_RESPONSE_BYTES_PER_KEY",
    "IdempotencyConflict",
    "StoredResponse",
    "StoredResponses",
]

MiB = 1024 * 1024
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600.0
DEFAULT_STORED_RESPONSE_BYTES_PER_KEY = 64 * MiB
DEFAULT_STORED_RESPONSE_BYTES = 1024 * MiB
# Free pages (4 KiB each) that may accumulate before they are given back to the file system.
_VACUUM_AFTER_PAGES = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    account_id INTEGER NOT NULL,
    idem_key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    created REAL NOT NULL,
    audit_id INTEGER NOT NULL,
    status INTEGER,                      -- NULL while the first request is being computed
    content_type TEXT,
    headers TEXT,
    size INTEGER NOT NULL DEFAULT 0,     -- bytes of body
    body BLOB,                           -- NULL once answered: not kept (over the caps)
    PRIMARY KEY (account_id, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency(created);
CREATE INDEX IF NOT EXISTS idempotency_sizes ON idempotency(account_id, created, size);
"""


class IdempotencyConflict(Exception):
    """An Idempotency-Key is being served right now, or was used for a different body."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredResponse:
    """A stored response; body None: it was given, and then not kept (over the caps)."""

    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes | None


class StoredResponses:
    """The idempotency table of a ledger's database; each method runs inside the ledger's
    transaction (or under its lock) on its connection `db`."""

    def __init__(
        self,
        db: sqlite3.Connection,
        ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S,
        bytes_per_key: int = DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
        total_bytes: int = DEFAULT_STORED_RESPONSE_BYTES,
    ):
        if not ttl_s > 0:
            raise ValueError(f"idempotency_ttl_s: expected > 0 seconds, got {ttl_s}")
        if not 0 <= int(bytes_per_key) <= int(total_bytes):
            raise ValueError(
                "stored response sizes: expected 0 <= bytes per key <= bytes in all, got "
                f"{bytes_per_key} and {total_bytes}"
            )
        self.db = db
        self.ttl_s = float(ttl_s)
        self.bytes_per_key, self.total_bytes = int(bytes_per_key), int(total_bytes)

    @staticmethod
    def create(db: sqlite3.Connection) -> None:
        """The table, in a new database or in one written before bodies had a size."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(idempotency)")}
        if columns and "size" not in columns:
            db.execute("ALTER TABLE idempotency ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE idempotency SET size = COALESCE(LENGTH(body), 0)")
        db.executescript(SCHEMA)

    def exists(self, account_id: int, idem_key: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM idempotency WHERE account_id = ? AND idem_key = ? AND created >= ?",
            (account_id, idem_key, time.time() - self.ttl_s),
        ).fetchone()
        return row is not None

    def lookup(self, account_id: int, idem_key: str, body_hash: str) -> StoredResponse | None:
        """The response stored for this request, or None if it is new; IdempotencyConflict
        when the key is in use by a request still computed, or was used for another one."""
        row = self.db.execute(
            "SELECT body_hash, status, content_type, headers, body FROM idempotency "
            "WHERE account_id = ? AND idem_key = ? AND created >= ?",
            (account_id, idem_key, time.time() - self.ttl_s),
        ).fetchone()
        if row is None:
            return None
        if row[0] != body_hash:
            raise IdempotencyConflict(
                "Idempotency-Key was already used for a different request body", 422
            )
        if row[1] is None:
            raise IdempotencyConflict(
                "a request with this Idempotency-Key is still being served; retry shortly", 409
            )
        body = None if row[4] is None else bytes(row[4])
        return StoredResponse(int(row[1]), row[2], json.loads(row[3]), body)

    def claim(
        self, account_id: int, idem_key: str, body_hash: str, audit_id: int, now: float
    ) -> None:
        """Mark the key as being served (inside the transaction that charged it)."""
        self.db.execute(
            "INSERT INTO idempotency(account_id, idem_key, body_hash, created, audit_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (account_id, idem_key, body_hash, now, audit_id),
        )

    def store(
        self,
        account_id: int,
        idem_key: str,
        status: int,
        content_type: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> None:
        """Keep the response of a claimed key, within the caps (inside a transaction)."""
        kept = body if len(body) <= self.bytes_per_key else None
        self.db.execute(
            "UPDATE idempotency SET status = ?, content_type = ?, headers = ?, size = ?, "
            "body = ? WHERE account_id = ? AND idem_key = ?",
            (
                status,
                content_type,
                json.dumps(dict(headers)),
                0 if kept is None else len(kept),
                kept,
                account_id,
                idem_key,
            ),
        )
        if kept is not None:
            self._drop_oldest(self.bytes_per_key, "account_id = ?", (account_id,))
            self._drop_oldest(self.total_bytes, "1", ())

    def release(self, account_id: int, idem_key: str) -> None:
        """Forget a key whose request was refunded, so that a retry runs afresh."""
        self.db.execute(
            "DELETE FROM idempotency WHERE account_id = ? AND idem_key = ?",
            (account_id, idem_key),
        )

    def pending(self) -> list[tuple[int, int]]:
        """(account_id, audit_id) of keys charged and never answered."""
        return self.db.execute(
            "SELECT account_id, audit_id FROM idempotency WHERE status IS NULL"
        ).fetchall()

    def forget_pending(self) -> None:
        self.db.execute("DELETE FROM idempotency WHERE status IS NULL")

    def expire(self, now: float) -> int:
        """Delete rows past their time to live; returns how many."""
        return self.db.execute(
            "DELETE FROM idempotency WHERE created < ?", (now - self.ttl_s,)
        ).rowcount

    def stored_bytes(self, account_id: int | None = None) -> int:
        """Bytes of response bodies kept, for one account or all."""
        if account_id is None:
            return int(
                self.db.execute("SELECT COALESCE(SUM(size), 0) FROM idempotency").fetchone()[0]
            )
        sql = "SELECT COALESCE(SUM(size), 0) FROM idempotency WHERE account_id = ?"
        return int(self.db.execute(sql, (account_id,)).fetchone()[0])

    def give_back_space(self) -> None:
        """Return free pages to the file system once enough have accumulated (outside a
        transaction)."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= _VACUUM_AFTER_PAGES:
            # A script, so that the statement runs to its end: each step frees one page, and
            # execute() would take only the first.
            self.db.executescript("PRAGMA incremental_vacuum;")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _drop_oldest(self, cap: int, where: str, args: tuple) -> None:
        total = int(
            self.db.execute(
                f"SELECT COALESCE(SUM(size), 0) FROM idempotency WHERE {where}", args
            ).fetchone()[0]
        )
        if total <= cap:
            return
        drop = []
        for rowid, size in self.db.execute(
            f"SELECT rowid, size FROM idempotency WHERE {where} AND size > 0 ORDER BY created",
            args,
        ):
            drop.append(rowid)
            total -= size
            if total <= cap:
                break
        self.db.executemany(
            "UPDATE idempotency SET body = NULL, size = 0 WHERE rowid = ?", [(r,) for r in drop]
        )
