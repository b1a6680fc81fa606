"""The query ledger: ``charge``, ``refund`` and ``usage`` per account.

One query is one image. A charge that would take an account past its budget is refused whole
(:class:`BudgetExceeded`) and costs nothing; a charge whose answer could not be computed is
refunded. :class:`MemoryLedger` keeps the counts of an in-process oracle
(:class:`megex.LocalOracle`); :class:`megex.sqlite_ledger.SQLiteLedger` is the service's, in
SQLite, with API keys, an audit log and stored responses for idempotent retries.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BudgetExceeded", "Charge", "Ledger", "MemoryLedger", "Usage"]

_HEADER_USED, _HEADER_BUDGET, _HEADER_REMAINING = (
    "X-Queries-Used",
    "X-Query-Budget",
    "X-Queries-Remaining",
)


@dataclass(frozen=True)
class Usage:
    """An account's count and budget (None: unlimited)."""

    used: int
    budget: int | None

    @property
    def remaining(self) -> int | float:
        return math.inf if self.budget is None else self.budget - self.used

    def headers(self) -> dict[str, str]:
        """The quota headers of the service's responses."""
        unlimited = self.budget is None
        return {
            _HEADER_USED: str(self.used),
            _HEADER_BUDGET: "unlimited" if unlimited else str(self.budget),
            _HEADER_REMAINING: "unlimited" if unlimited else str(self.remaining),
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Usage | None:
        """The usage that :meth:`headers` wrote (case-insensitive mapping), or None."""
        used, budget = headers.get(_HEADER_USED), headers.get(_HEADER_BUDGET)
        if used is None or budget is None:
            return None
        return cls(int(used), None if budget == "unlimited" else int(budget))

    def to_dict(self) -> dict[str, int | None]:
        remaining = None if self.budget is None else int(self.remaining)
        return {"used": self.used, "budget": self.budget, "remaining": remaining}

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> Usage:
        """The usage that :meth:`to_dict` wrote."""
        budget = doc.get("budget")
        return cls(int(doc.get("used") or 0), None if budget is None else int(budget))


class BudgetExceeded(RuntimeError):
    """A request would take the ledger past its budget; nothing was charged."""

    def __init__(
        self, requested: int, usage: Usage | int | float, budget: int | float | None = None
    ):
        # (requested, usage) from a ledger, or (requested, remaining, budget) from a user's
        # own oracle, as the Oracle protocol documents it.
        if not isinstance(usage, Usage):
            limit = None if budget is None or not math.isfinite(budget) else int(budget)
            used = 0 if limit is None else limit - int(usage)
            usage = Usage(used, limit)
        self.requested, self.usage = requested, usage
        super().__init__(
            f"query budget exceeded: this request needs {requested} queries but only "
            f"{self.remaining} of {self.budget} remain; nothing was charged"
        )

    @property
    def remaining(self) -> int | float:
        return self.usage.remaining

    @property
    def budget(self) -> int | float:
        return math.inf if self.usage.budget is None else self.usage.budget


@dataclass(frozen=True)
class Charge:
    """Queries charged to an account; `usage` is the account's usage after the charge.
    audit_id and idem_key: the service's audit row and idempotency key, if any."""

    account_id: int
    count: int
    usage: Usage
    audit_id: int | None = None
    idem_key: str | None = None


class Ledger(Protocol):
    """What an oracle needs of a ledger."""

    def charge(self, account_id: int, count: int) -> Charge: ...

    def refund(self, charge: Charge) -> None: ...

    def usage(self, account_id: int) -> Usage: ...


class MemoryLedger:
    """Counts in this process, every account with the same budget (None: unlimited)."""

    def __init__(self, budget: int | None = None):
        if budget is not None and int(budget) < 0:
            raise ValueError(f"budget: expected >= 0 or None, got {budget}")
        self.budget = None if budget is None else int(budget)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def usage(self, account_id: int) -> Usage:
        return Usage(self._used.get(account_id, 0), self.budget)

    def charge(self, account_id: int, count: int) -> Charge:
        with self._lock:
            usage = self.usage(account_id)
            if count > usage.remaining:
                raise BudgetExceeded(count, usage)
            self._used[account_id] = usage.used + count
        return Charge(account_id, count, Usage(usage.used + count, self.budget))

    def refund(self, charge: Charge) -> None:
        with self._lock:
            self._used[charge.account_id] -= charge.count

    def set_used(self, account_id: int, used: int) -> None:
        """Set a count, e.g. that of a service restored from a checkpoint."""
        if int(used) < 0:
            raise ValueError(f"queries_used: expected >= 0, got {used}")
        with self._lock:
            self._used[account_id] = int(used)
