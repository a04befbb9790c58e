"""The in-process store (pure): exact for one process, as sluicegate was before `state:`.

With N processes each keeps its own, so a key may get N times its rpm, tpm and budget. It is
also what `FleetStore` falls back on while Redis cannot be reached (`on_unavailable: open`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from proxy.admission import Limits
from proxy.config import ClientKey
from proxy.fleet.periods import MICROS, Carry, budget_micros, period_id, period_of
from proxy.fleet.store import OVER_BUDGET, refusal

Clock = Callable[[], float]


class Spending:
    """Micro-dollars by key name, for the key's current period only: a new period's first
    charge forgets the old one."""

    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[str, int]] = {}

    def get(self, name: str, period: str) -> int:
        held = self._by_name.get(name)
        return held[1] if held is not None and held[0] == period else 0

    def add(self, name: str, period: str, micros: int) -> None:
        self._by_name[name] = (period, self.get(name, period) + micros)

    def set(self, name: str, period: str, micros: int) -> None:
        self._by_name[name] = (period, micros)


class LocalStore:
    def __init__(self, wall: Clock = time.time, monotonic: Clock = time.monotonic) -> None:
        self.limits = Limits()  # kept across reloads: a changed limit applies from the next request
        self.spent = Spending()
        self.carry = Carry()
        self._wall, self._monotonic = wall, monotonic

    async def admit(self, key: ClientKey | None) -> None:
        if key is not None:
            self.admit_now(key)

    def admit_now(self, key: ClientKey) -> None:
        budget = budget_micros(key)
        if budget is not None:
            now = self._wall()
            if self.spent.get(key.name, period_id(period_of(key), now)) >= budget:
                raise refusal(key, OVER_BUDGET, 0.0, now)
        self.limits.admit(key, self._monotonic())

    async def charge(self, key: ClientKey | None, tokens: int, cost_usd: float | None) -> None:
        if key is None:
            return
        period = period_id(period_of(key), self._wall())
        self.add(key, tokens, period, self.carry.micros(key.name, period, cost_usd))

    def add(self, key: ClientKey, tokens: int, period: str, micros: int) -> None:
        """Charges whole micro-dollars (already carried) to `period`, tokens to the bucket."""
        self.limits.charge(key, tokens, self._monotonic())
        if micros:
            self.spent.add(key.name, period, micros)

    async def spend(self, keys: Sequence[ClientKey]) -> dict[str, float]:
        now = self._wall()
        return {
            key.name: self.spent.get(key.name, period_id(period_of(key), now)) / MICROS
            for key in keys
        }

    async def aclose(self) -> None:
        return None
