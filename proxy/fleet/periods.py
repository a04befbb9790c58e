"""Budget periods and money (pure): which period a moment falls in, when it resets, and USD
as integer micro-dollars, so spend adds up without float drift."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from proxy.config import BudgetPeriod, ClientKey

MICROS = 1_000_000
_DAY = 86_400
_EPSILON = 1e-6  # of a micro-dollar: float error, not money
DEFAULT_PERIOD: BudgetPeriod = "day"  # what a key without a budget reports its spend for
# Seconds a period's spend is kept in the store, by the length of its id; 0: for ever.
_RETAIN = {len("2026-12-06"): 3 * _DAY, len("2026-12"): 93 * _DAY}


def period_of(key: ClientKey) -> BudgetPeriod:
    return key.budget.period if key.budget is not None else DEFAULT_PERIOD


def period_id(period: BudgetPeriod, now: float) -> str:
    """The UTC calendar period `now` (a Unix time) falls in: "2026-12-06", "2026-12", "total"."""
    if period == "total":
        return "total"
    return _period_on(period, int(now // _DAY))  # Unix time has no leap seconds


@functools.lru_cache(maxsize=16)
def _period_on(period: BudgetPeriod, day: int) -> str:
    """Per request, admission asks for the period: formatted once a day."""
    moment = datetime.fromtimestamp(day * _DAY, UTC)
    return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def resets_at(period: BudgetPeriod, now: float) -> datetime | None:
    """When the period `now` falls in ends (UTC); None for `total`, which never resets."""
    if period == "total":
        return None
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return datetime.fromtimestamp(start.timestamp() + _DAY, UTC)
    if moment.month == 12:
        return start.replace(year=moment.year + 1, month=1, day=1)
    return start.replace(month=moment.month + 1, day=1)


def retain_seconds(period: str) -> int:
    """How long the spend of a period (an id from `period_id`) is kept after it is written."""
    return 0 if period == "total" else _RETAIN[len(period)]


def budget_micros(key: ClientKey) -> int | None:
    return None if key.budget is None else round(key.budget.usd * MICROS)


class Carry:
    """USD → whole micro-dollars, carrying the fraction to the next charge of the same key
    in the same period, so a stream of 5.6 µ$ requests is charged 5.6 µ$ each on average,
    not 6. What a process holds back at any time is under one micro-dollar per key; one
    (period, fraction) is kept per key, and a new period starts from zero."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest: dict[str, tuple[str, float]] = {}

    def micros(self, name: str, period: str, usd: float | None) -> int:
        if not usd or usd < 0:
            return 0
        held = self._rest.get(name)
        total = (held[1] if held is not None and held[0] == period else 0.0) + usd * MICROS
        whole = int(total + _EPSILON)  # 5 x 5.6 is 27.999999999999996 in binary floats
        self._rest[name] = (period, total - whole)
        return whole
