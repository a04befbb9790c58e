"""proxy.fleet's pure parts, with tables and no event loop: budget periods, micro-dollars
with a carry, the in-process store's budget check, and the ledger of running totals."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.config import Budget, ClientKey
from proxy.errors import BudgetExceeded
from proxy.fleet.ledger import Ledger
from proxy.fleet.local import LocalStore
from proxy.fleet.periods import Carry, period_id, resets_at, retain_seconds

MIDDAY = datetime(2026, 12, 31, 12, 30, tzinfo=UTC).timestamp()
LAST_SECOND = datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "ident", "reset"),
    [
        ("day", MIDDAY, "2026-12-31", datetime(2027, 1, 1, tzinfo=UTC)),
        ("month", MIDDAY, "2026-12", datetime(2027, 1, 1, tzinfo=UTC)),
        ("total", MIDDAY, "total", None),
        ("day", LAST_SECOND, "2026-02-28", datetime(2026, 3, 1, tzinfo=UTC)),
        ("month", LAST_SECOND, "2026-02", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_periods_follow_the_utc_calendar(
    period: str, now: float, ident: str, reset: datetime | None
) -> None:
    assert period_id(period, now) == ident  # type: ignore[arg-type]
    assert resets_at(period, now) == reset  # type: ignore[arg-type]


def test_spend_is_kept_a_little_longer_than_its_period() -> None:
    assert retain_seconds("2026-12-31") == 3 * 86_400
    assert retain_seconds("2026-12") == 93 * 86_400
    assert retain_seconds("total") == 0  # for ever


def test_the_carry_charges_fractions_on_average() -> None:
    carry = Carry()
    charged = [carry.micros("k", "total", 0.0000056) for _ in range(5)]
    assert charged == [5, 6, 5, 6, 6]  # 28 = 5 x 5.6
    assert carry.micros("k", "total", None) == 0  # unpriced
    assert carry.micros("other", "total", 0.0000004) == 0  # held back, not lost:
    assert carry.micros("other", "total", 0.0000007) == 1


def test_the_carry_keeps_one_fraction_per_key_whatever_the_periods() -> None:
    carry = Carry()
    for day in range(1, 31):
        carry.micros("k", f"2026-11-{day:02}", 0.0000004)  # 0.4 µ$ held back each day
    assert len(carry._rest) == 1  # not one entry per period for ever
    assert carry.micros("k", "2026-12-01", 0.0000007) == 0  # a new period starts from zero
    assert carry.micros("k", "2026-12-01", 0.0000004) == 1


def test_the_local_store_refuses_at_the_budget_and_counts_per_period() -> None:
    clock = [MIDDAY]
    store = LocalStore(wall=lambda: clock[0], monotonic=lambda: 0.0)
    key = ClientKey("k", "0" * 64, budget=Budget(0.00001, "day"))  # 10 micro-USD
    store.admit_now(key)
    store.add(key, 5, "2026-12-31", 10)
    with pytest.raises(BudgetExceeded) as info:
        store.admit_now(key)
    assert "resets at 2027-01-01T00:00:00Z" in info.value.message
    clock[0] += 86_400  # the next day starts at zero
    store.admit_now(key)
    store.add(key, 0, "2027-01-01", 3)
    assert store.spent.get("k", "2027-01-01") == 3
    assert store.spent.get("k", "2026-12-31") == 0  # forgotten once the next period charges


def test_the_ledger_keeps_running_totals_and_what_redis_confirmed() -> None:
    ledger = Ledger()
    ledger.add("k", "2026-12-30", 7, 0, -1)
    charged = ledger.add("k", "2026-12-31", 5, 40, 100)
    assert ledger.pending_names() == ["k"]
    assert sorted(charged.periods()) == [("2026-12-30", 7, 0), ("2026-12-31", 5, 0)]
    ledger.confirm("k", 40, {"2026-12-30": 7, "2026-12-31": 5})
    assert ledger.pending_names() == []  # all confirmed
    ledger.add("k", "2026-12-31", 3, 10, 100)
    ledger.confirm("k", 40, {"2026-12-31": 5})  # a late reply for an older total: no step back
    assert (charged.tokens, charged.tokens_acked, charged.micros["2026-12-31"]) == (50, 40, 8)
    assert ledger.pending_names() == ["k"]
    ledger.confirm("k", 50, {"2026-12-31": 8})
    ledger.add("k", "2027-01-01", 1, 0, 100)  # a third period: the oldest, confirmed, is dropped
    assert sorted(p for p, _, _ in charged.periods()) == ["2026-12-31", "2027-01-01"]
    assert ledger.names() == ["k"]


def test_the_ledger_keeps_an_old_period_until_it_is_written() -> None:
    ledger = Ledger()
    for day, micros in (("2026-12-29", 4), ("2026-12-30", 5), ("2026-12-31", 6)):
        charged = ledger.add("k", day, micros, 0, -1)  # none confirmed: Redis was away
    assert [p for p, _, _ in sorted(charged.periods())] == [
        "2026-12-29",
        "2026-12-30",
        "2026-12-31",
    ]
    ledger.confirm("k", 0, {"2026-12-29": 4, "2026-12-30": 5, "2026-12-31": 6})
    ledger.add("k", "2027-01-01", 1, 0, -1)
    assert sorted(p for p, _, _ in charged.periods()) == ["2026-12-31", "2027-01-01"]
