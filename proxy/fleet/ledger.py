"""What one process has charged to the shared store (pure): all of it, per key name and
period, so it can be written again if Redis lost it (restarted empty), and the part Redis has
not seen yet (charged while it could not be reached)."""

from __future__ import annotations

from dataclasses import dataclass, field

_PERIODS_KEPT = 2  # the current period and the one before it (a charge across midnight)


@dataclass(slots=True)
class Pending:
    tokens: int = 0
    micros: dict[str, int] = field(default_factory=dict)  # by period


class Ledger:
    __slots__ = ("_all", "_pending", "tpm")

    def __init__(self) -> None:
        self._all: dict[str, dict[str, int]] = {}
        self._pending: dict[str, Pending] = {}
        self.tpm: dict[str, int] = {}  # each key's tpm when last charged (-1: none)

    def add(self, name: str, period: str, micros: int) -> None:
        periods = self._all.setdefault(name, {})
        periods[period] = periods.get(period, 0) + micros
        if len(periods) > _PERIODS_KEPT:
            del periods[min(periods)]  # ids sort in time order: "2026-12-05" < "2026-12-06"

    def hold(self, name: str, period: str, micros: int, tokens: int) -> None:
        """Redis has not seen this charge (already `add`ed) yet."""
        held = self._pending.setdefault(name, Pending())
        held.tokens += tokens
        held.micros[period] = held.micros.get(period, 0) + micros

    def take(self, name: str) -> Pending:
        """Removes what is pending for `name`, for a write; `restore` it if that fails."""
        return self._pending.pop(name, None) or Pending()

    def restore(self, name: str, taken: Pending) -> None:
        held = self._pending.setdefault(name, Pending())
        held.tokens += taken.tokens
        for period, micros in taken.micros.items():
            held.micros[period] = held.micros.get(period, 0) + micros

    def pending_names(self) -> list[str]:
        return list(self._pending)

    def names(self) -> list[str]:
        """Every key name charged (in a period still kept), held or not."""
        return list(self._all.keys() | self._pending.keys())

    def spends(self, name: str, taken: Pending) -> list[tuple[str, int, int]]:
        """(period, all charged, pending) for every period known for `name`."""
        periods = self._all.get(name, {})
        return [(p, periods.get(p, 0), taken.micros.get(p, 0)) for p in {*periods, *taken.micros}]
