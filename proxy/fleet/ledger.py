"""What one process has charged to the shared store (pure), as running totals per key name:
tokens, and micro-dollars per period. Each total is sent whole, and Redis keeps, per
process, the highest total it has applied (`proxy.fleet.scripts`), so a write sent twice
(its reply was lost, it was cut short, it came back after a timeout) adds nothing the second
time. What Redis has confirmed is kept too: the rest is pending, to be written again."""

from __future__ import annotations

from dataclasses import dataclass, field

_PERIODS_KEPT = 2  # the current period and the one before it (a charge across midnight)


@dataclass(slots=True)
class Charged:
    """One key's running totals, and the part of each Redis has confirmed."""

    tokens: int = 0
    tokens_acked: int = 0
    micros: dict[str, int] = field(default_factory=dict)  # by period id
    acked: dict[str, int] = field(default_factory=dict)
    tpm: int = -1  # the key's tpm when last charged (-1: none)

    def pending(self) -> bool:
        return self.tokens > self.tokens_acked or any(
            total > self.acked.get(period, 0) for period, total in self.micros.items()
        )

    def periods(self) -> list[tuple[str, int, int]]:
        """(period, total, confirmed) for every period kept."""
        return [(p, total, self.acked.get(p, 0)) for p, total in self.micros.items()]


class Ledger:
    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, Charged] = {}

    def add(self, name: str, period: str, micros: int, tokens: int, tpm: int) -> Charged:
        """Records a charge before it is written (so it is never neither written nor kept)."""
        charged = self._by_name.setdefault(name, Charged())
        charged.tokens += tokens
        charged.tpm = tpm
        charged.micros[period] = charged.micros.get(period, 0) + micros
        if len(charged.micros) > _PERIODS_KEPT:
            self._forget_old(charged)
        return charged

    @staticmethod
    def _forget_old(charged: Charged) -> None:
        """Drops the oldest periods Redis has confirmed whole; ids sort in time order
        ("2026-12-05" < "2026-12-06"). A period still pending is kept until it is written."""
        for period in sorted(charged.micros)[:-_PERIODS_KEPT]:
            if charged.micros[period] <= charged.acked.get(period, 0):
                del charged.micros[period]
                charged.acked.pop(period, None)

    def confirm(self, name: str, tokens: int, periods: dict[str, int]) -> None:
        """Redis has applied these totals (or higher ones): never lowers what is confirmed."""
        charged = self._by_name[name]
        charged.tokens_acked = max(charged.tokens_acked, tokens)
        for period, total in periods.items():
            charged.acked[period] = max(charged.acked.get(period, 0), total)

    def get(self, name: str) -> Charged | None:
        return self._by_name.get(name)

    def pending_names(self) -> list[str]:
        return [name for name, charged in self._by_name.items() if charged.pending()]

    def names(self) -> list[str]:
        """Every key name charged (in a period still kept)."""
        return list(self._by_name)
