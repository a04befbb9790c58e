"""The state store's interface (pure), and the refusals admission gives.

A store decides, for one client key, whether a request may go upstream (`admit`: rpm, tpm
and the budget in one call), and records what it used when it ends (`charge`: tokens and
cost). `LocalStore` keeps it in this process; `FleetStore` in Redis, shared by the fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from proxy.admission import rate_limited
from proxy.config import ClientKey
from proxy.errors import BudgetExceeded, RateLimited
from proxy.fleet.periods import period_of, resets_at

# What an admission check can answer (the Lua scripts answer the same numbers).
ADMITTED, RPM_LIMITED, TPM_LIMITED, OVER_BUDGET = 0, 1, 2, 3
_ADJECTIVES = {"day": "daily", "month": "monthly", "total": "total"}


class Store(Protocol):
    async def admit(self, key: ClientKey | None) -> None:
        """Takes a request, or raises RateLimited, BudgetExceeded or StateUnavailable.
        None (no keys configured): nothing to check."""

    async def charge(self, key: ClientKey | None, tokens: int, cost_usd: float | None) -> None:
        """A finished request's tokens and cost (None: unpriced); never raises, and does not
        wait for a shared store (which writes it within `FleetStore`'s FLUSH_SECONDS)."""

    async def spend(self, keys: Sequence[ClientKey]) -> dict[str, float]:
        """USD each key has spent in its current period (see `period_of`)."""
        ...

    async def aclose(self) -> None: ...


def refusal(key: ClientKey, verdict: int, wait: float, now: float) -> RateLimited | BudgetExceeded:
    """The error for a verdict other than ADMITTED; `wait` in seconds, `now` a Unix time.
    A spent budget's message names the period and its reset, never an amount."""
    if verdict == RPM_LIMITED:
        return rate_limited(key, "requests", wait)
    if verdict == TPM_LIMITED:
        return rate_limited(key, "tokens", wait)
    period = period_of(key)
    end = resets_at(period, now)
    when = (
        "It does not reset."
        if end is None
        else f"It resets at {end.strftime('%Y-%m-%dT%H:%M:%SZ')} (UTC)."
    )
    return BudgetExceeded(f"The key '{key.name}' has used its {_ADJECTIVES[period]} budget. {when}")


class StoreDown(Exception):
    """The shared store could not answer; the message is the error's class name only (an
    error's text may name the host, and the URL is a secret)."""
