"""The service's ledger in SQLite: API keys, per-key budgets and counts, audit log,
idempotent replays (:mod:`megex.stored_responses`), and the flags that query monitors
raised (:mod:`megex.detection`; :func:`flag_report` reads them while a server runs).

Everything lives in one database (WAL mode), so a restarted server neither resets nor loses
a count. Keys are stored only as salted SHA-256 hashes. A request is charged inside a
transaction *before* it is computed and refunded if the computation fails; a request that
would pass the key's budget is refused whole (:class:`megex.BudgetExceeded`) and costs
nothing.

Durability: commits use ``synchronous=NORMAL``, which survives a crash of the server process;
a power failure may lose the last few commits. After a crash, requests that were charged and
never answered stay charged, except those sent with an Idempotency-Key, which the next server
refunds when it starts (their retries then run, and are charged, once).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ledger import BudgetExceeded, Charge, Usage
from .ledger_file import SCHEMA, LedgerInUse, flag_report, hold_exclusively
from .stored_responses import (
    DEFAULT_IDEMPOTENCY_TTL_S,
    DEFAULT_STORED_RESPONSE_BYTES,
    DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
    IdempotencyConflict,
    StoredResponse,
    StoredResponses,
)

__all__ = [
    "Account",
    "IdempotencyConflict",
    "flag_report",
    "LedgerInUse",
    "SQLiteLedger",
    "StoredResponse",
    "Unauthorized",
]

# The open (no-auth) account: a value no SHA-256 hex digest can take.
_OPEN_KEY_HASH = "open"


class Unauthorized(Exception):
    """No API key, or one the server does not know."""


@dataclass(frozen=True)
class Account:
    id: int
    label: str


class SQLiteLedger:
    """Keys, budgets, counts, audit log and stored responses in one SQLite database.

    keys: API key -> budget (None: the default budget); None or empty runs the server open,
    with one shared account. Keys in the database but not in `keys` are deactivated; their
    counts are kept. default_budget: None means unlimited. idempotency_ttl_s,
    stored_response_bytes_per_key, stored_response_bytes: how long and how much of the
    responses to idempotent requests are kept (:mod:`megex.stored_responses`).
    """

    def __init__(
        self,
        path: str | os.PathLike = ":memory:",
        *,
        keys: Mapping[str, int | None] | Iterable[str] | None = None,
        default_budget: int | None = None,
        idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S,
        stored_response_bytes_per_key: int = DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
        stored_response_bytes: int = DEFAULT_STORED_RESPONSE_BYTES,
    ):
        if default_budget is not None and int(default_budget) < 0:
            raise ValueError(f"budget: expected >= 0 or None, got {default_budget}")
        if keys is not None and not isinstance(keys, Mapping):
            keys = dict.fromkeys(keys)
        self.open = not keys
        self.path = str(path)
        self._lock_file = None
        if self.path != ":memory:":
            real = Path(self.path).resolve()
            real.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = hold_exclusively(Path(f"{real}.lock"), self.path)
        try:
            # One connection guarded by a lock: requests run in a thread pool, and SQLite
            # serialises writers anyway.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._lock = threading.Lock()
            self._use_incremental_vacuum()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # The write-ahead log is truncated back to this size after a checkpoint.
            self._db.execute("PRAGMA journal_size_limit=16777216")
            self._db.executescript(SCHEMA)
            StoredResponses.create(self._db)
            self.responses = StoredResponses(
                self._db,
                idempotency_ttl_s,
                stored_response_bytes_per_key,
                stored_response_bytes,
            )
            self._salt = self._load_salt()
            self._sync_keys(keys or {}, default_budget)
            self._refund_interrupted()
            self._expire()
        except BaseException:
            if self._lock_file is not None:  # a ledger that failed to open holds nothing
                self._lock_file.close()
            raise

    @property
    def idempotency_ttl_s(self) -> float:
        return self.responses.ttl_s

    def _use_incremental_vacuum(self) -> None:
        """Freed pages go back to the file system on request (incremental vacuum). A new
        database takes the setting at once; one written without it is rebuilt once."""
        mode = self._db.execute("PRAGMA auto_vacuum").fetchone()[0]
        if mode != 2:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if self._db.execute("PRAGMA page_count").fetchone()[0] > 0:
                self._db.execute("VACUUM")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the connection's lock: committed when the block
        ends (a return included), rolled back when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- setup ------------------------------------------------------------------------------

    def _load_salt(self) -> bytes:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()
        if row:
            return bytes.fromhex(row[0])
        salt = secrets.token_bytes(16)
        self._db.execute("INSERT INTO meta(name, value) VALUES ('salt', ?)", (salt.hex(),))
        return salt

    def hash_key(self, key: str) -> str:
        return hashlib.sha256(self._salt + key.encode()).hexdigest()

    def _sync_keys(self, keys: Mapping[str, int | None], default_budget: int | None) -> None:
        now = time.time()
        entries = (
            [(_OPEN_KEY_HASH, "open", default_budget)]
            if self.open
            else [
                (h, f"key-{h[:8]}", default_budget if b is None else int(b))
                for h, b in ((self.hash_key(k), b) for k, b in keys.items())
            ]
        )
        with self._transaction() as db:
            db.execute("UPDATE accounts SET active = 0")
            for key_hash, label, budget in entries:
                db.execute(
                    "INSERT INTO accounts(key_hash, label, budget, used, active, created) "
                    "VALUES (?, ?, ?, 0, 1, ?) ON CONFLICT(key_hash) DO UPDATE SET "
                    "budget = excluded.budget, active = 1",
                    (key_hash, label, budget, now),
                )

    def _refund_interrupted(self) -> None:
        """Refund idempotent requests that a previous server process charged but never
        answered, so that the client's retry runs (and is charged) once."""
        with self._transaction() as db:
            for account_id, audit_id in self.responses.pending():
                row = db.execute(
                    "SELECT count FROM audit WHERE id = ? AND refunded = 0", (audit_id,)
                ).fetchone()
                if row is not None:
                    self._give_back(account_id, int(row[0]), audit_id)
            self.responses.forget_pending()

    def _expire(self) -> None:
        """Delete stored responses past their time to live and give their space back."""
        with self._transaction():
            self.responses.expire(time.time())
        with self._lock:
            self.responses.give_back_space()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

    # --- keys and usage ---------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Account:
        """The account of `key` (any key, or none, on an open server), or Unauthorized."""
        key_hash = _OPEN_KEY_HASH if self.open else None
        if key_hash is None:
            if not key:
                raise Unauthorized(
                    "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
                )
            key_hash = self.hash_key(key)
        with self._lock:
            row = self._db.execute(
                "SELECT id, label FROM accounts WHERE key_hash = ? AND active = 1", (key_hash,)
            ).fetchone()
        if row is None:
            raise Unauthorized("unknown API key")
        return Account(int(row[0]), row[1])

    def usage(self, account_id: int) -> Usage:
        with self._lock:
            return self._usage(account_id)

    def _usage(self, account_id: int) -> Usage:
        used, budget = self._db.execute(
            "SELECT used, budget FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return Usage(int(used), None if budget is None else int(budget))

    def total_used(self) -> int:
        """Queries charged over every account."""
        with self._lock:
            return int(
                self._db.execute("SELECT COALESCE(SUM(used), 0) FROM accounts").fetchone()[0]
            )

    def audit_rows(self, account_id: int | None = None) -> list[tuple[float, str, int, int]]:
        """(time, endpoint, count, refunded) of every audited request, oldest first."""
        sql = "SELECT time, endpoint, count, refunded FROM audit"
        args: tuple = ()
        if account_id is not None:
            sql, args = sql + " WHERE account_id = ?", (account_id,)
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    # --- flags of the query monitors ---------------------------------------------------------

    def record_flags(self, account_id: int, flags: Iterable[Any]) -> None:
        """Store flags raised on an account: objects with monitor, statistic, threshold,
        queries_seen and time (:class:`megex.detection.Flag`)."""
        rows = [
            (
                account_id,
                float(f.time),
                str(f.monitor),
                float(f.statistic),
                float(f.threshold),
                int(f.queries_seen),
            )
            for f in flags
        ]
        if not rows:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO flags(account_id, time, monitor, statistic, threshold, "
                "queries_seen) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def flag_rows(self, account_id: int | None = None) -> list[tuple]:
        """(time, monitor, statistic, threshold, queries_seen) of every flag, oldest first."""
        sql = "SELECT time, monitor, statistic, threshold, queries_seen FROM flags"
        args: tuple = ()
        if account_id is not None:
            sql, args = sql + " WHERE account_id = ?", (account_id,)
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    # --- charging ---------------------------------------------------------------------------

    def charge(
        self,
        account_id: int,
        count: int,
        endpoint: str = "",
        *,
        idem_key: str | None = None,
        body_hash: str = "",
        images: bytes | None = None,
    ) -> Charge | StoredResponse:
        """Charge `count` queries, or return the stored response of a repeated idempotent
        request (charging nothing). Raises BudgetExceeded or IdempotencyConflict."""
        now = time.time()
        with self._transaction() as db:
            expired = self.responses.expire(now)
            if idem_key is not None:
                stored = self.responses.lookup(account_id, idem_key, body_hash)
                if stored is not None:
                    return stored
            usage = self._usage(account_id)
            if count > usage.remaining:
                raise BudgetExceeded(count, usage)
            db.execute("UPDATE accounts SET used = used + ? WHERE id = ?", (count, account_id))
            audit_id = db.execute(
                "INSERT INTO audit(account_id, time, endpoint, count, images) "
                "VALUES (?, ?, ?, ?, ?)",
                (account_id, now, endpoint, count, images),
            ).lastrowid
            if idem_key is not None:
                self.responses.claim(account_id, idem_key, body_hash, int(audit_id), now)
        if expired:
            with self._lock:
                self.responses.give_back_space()
        new_usage = Usage(usage.used + count, usage.budget)
        return Charge(account_id, count, new_usage, int(audit_id), idem_key)

    def finish(
        self,
        charge: Charge,
        status: int,
        content_type: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Store the response of an idempotent request, for replays, within the caps."""
        if charge.idem_key is None:
            return
        with self._transaction():
            self.responses.store(
                charge.account_id, charge.idem_key, status, content_type, body, headers or {}
            )
        with self._lock:
            self.responses.give_back_space()

    def refund(self, charge: Charge) -> None:
        """Give back a charge whose computation failed; a retry may then run again."""
        with self._transaction():
            self._give_back(charge.account_id, charge.count, charge.audit_id)
            if charge.idem_key is not None:
                self.responses.release(charge.account_id, charge.idem_key)

    def has_idempotency_key(self, account_id: int, idem_key: str) -> bool:
        """Whether `idem_key` names a request of this account that was charged (and has not
        expired): a repeat of it is answered without a charge."""
        with self._lock:
            return self.responses.exists(account_id, idem_key)

    def stored_response(
        self, account_id: int, idem_key: str, body_hash: str
    ) -> StoredResponse | None:
        """The stored response of a repeated idempotent request, None for a new one;
        IdempotencyConflict when the key is still being served or names another body."""
        with self._lock:
            return self.responses.lookup(account_id, idem_key, body_hash)

    def stored_bytes(self, account_id: int | None = None) -> int:
        """Bytes of stored response bodies, of one account or of all."""
        with self._lock:
            return self.responses.stored_bytes(account_id)

    def _give_back(self, account_id: int, count: int, audit_id: int | None) -> None:
        # Inside a transaction: the count goes back and its audit row says so.
        self._db.execute("UPDATE accounts SET used = used - ? WHERE id = ?", (count, account_id))
        self._db.execute("UPDATE audit SET refunded = 1 WHERE id = ?", (audit_id,))
