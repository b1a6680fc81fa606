"""The ledger protocol: the in-memory and the SQLite ledger charge, refuse and refund alike."""

from __future__ import annotations

import math

import pytest

from megex import BudgetExceeded
from megex.ledger import Ledger, MemoryLedger, Usage
from megex.sqlite_ledger import SQLiteLedger


def _memory() -> tuple[Ledger, int]:
    return MemoryLedger(budget=10), 0


def _sqlite() -> tuple[Ledger, int]:
    ledger = SQLiteLedger(keys={"k": None}, default_budget=10)
    return ledger, ledger.authenticate("k").id


@pytest.mark.parametrize("make", [_memory, _sqlite], ids=["memory", "sqlite"])
def test_charge_refuse_refund(make):
    ledger, account = make()
    charge = ledger.charge(account, 8)
    assert charge.usage == Usage(8, 10) == ledger.usage(account)
    with pytest.raises(BudgetExceeded, match="needs 3 queries but only 2 of 10 remain") as info:
        ledger.charge(account, 3)
    assert info.value.requested == 3 and info.value.remaining == 2 and info.value.budget == 10
    assert ledger.usage(account).used == 8
    ledger.refund(charge)
    assert ledger.usage(account) == Usage(0, 10)


def test_unlimited_usage_and_its_wire_forms():
    ledger = MemoryLedger()
    ledger.charge(0, 5)
    usage = ledger.usage(0)
    assert usage.remaining == math.inf
    assert usage.headers() == {
        "X-Queries-Used": "5",
        "X-Query-Budget": "unlimited",
        "X-Queries-Remaining": "unlimited",
    }
    for usage in (Usage(5, None), Usage(3, 7)):
        assert Usage.from_headers(usage.headers()) == usage
        assert Usage.from_dict(usage.to_dict()) == usage
    assert Usage.from_headers({}) is None
    with pytest.raises(ValueError, match="budget"):
        MemoryLedger(budget=-1)
