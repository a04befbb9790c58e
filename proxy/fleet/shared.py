"""`FleetStore`: limits and budgets in Redis, shared by every process that points at it, and
what happens while Redis cannot be reached.

Each call is bounded by `state.timeout`. A call that fails or times out marks the store down
(one `on_transition` call, so one log line, not one per request) and from then on requests
do not wait on Redis at all: `open` admits them on this process's own buckets and the spend
last seen plus its own charges; `closed` refuses keys with limits or a budget (503). Charges
go on being recorded in the process (`Ledger`). A background probe pings every
PROBE_SECONDS; when Redis answers, the held charges are written back, and then the store is
up again. A Redis restarted empty is told by its missing per-key epoch: each process then
writes back everything it charged this period, so the spend again equals the bill.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence

from proxy.config import ClientKey, StateSettings
from proxy.errors import StateUnavailable
from proxy.fleet.ledger import Ledger
from proxy.fleet.local import Clock, LocalStore
from proxy.fleet.periods import MICROS, budget_micros, period_id, period_of, retain_seconds
from proxy.fleet.remote import RedisState
from proxy.fleet.scripts import MISMATCH
from proxy.fleet.store import ADMITTED, StoreDown, refusal

PROBE_SECONDS = 0.5
PROBE_TIMEOUT = 1.0  # a probe writes back held charges: more than one round trip
Transition = Callable[[bool, str], None]  # (up, the error's class name when down)


def _nothing(_up: bool, _why: str) -> None:
    return None


class FleetStore:
    def __init__(
        self,
        remote: RedisState,
        settings: StateSettings,
        *,
        on_transition: Transition = _nothing,
        on_error: Callable[[], None] = lambda: None,
        wall: Clock = time.time,
    ) -> None:
        self.local = LocalStore(wall=wall)  # the fallback, and a mirror of the spend seen
        self.up = True
        self._remote, self._wall = remote, wall
        self._timeout, self._closed = settings.timeout, settings.on_unavailable == "closed"
        self._on_transition, self._on_error = on_transition, on_error
        self._ledger = Ledger()
        self._epochs: dict[str, str] = {}  # per key name, as last seen in Redis
        self._locks: dict[str, asyncio.Lock] = {}
        self._probe: asyncio.Task[None] | None = None

    async def admit(self, key: ClientKey | None) -> None:
        if key is None or not key.limited:
            return
        if self.up:
            now = self._wall()
            period = period_id(period_of(key), now)
            try:
                async with asyncio.timeout(self._timeout):
                    verdict, wait, spent = await self._admit(key, period)
            except (StoreDown, TimeoutError) as exc:
                self._down(exc)
            else:
                self.local.spent.set(key.name, period, spent)
                if verdict != ADMITTED:
                    raise refusal(key, verdict, wait / 1000, now)
                return
        if self._closed:
            raise StateUnavailable("sluicegate cannot reach its state store; try again shortly")
        self.local.admit_now(key)

    async def _admit(self, key: ClientKey, period: str) -> tuple[int, int, int]:
        budget = budget_micros(key)
        limits = (key.rpm or -1, key.tpm or -1, -1 if budget is None else budget)
        reply = await self._remote.admit(key.name, self._epochs.get(key.name, ""), period, limits)
        if reply[0] == MISMATCH:
            await self._sync(key.name, key.tpm or -1)
            reply = await self._remote.admit(key.name, self._epochs[key.name], period, limits)
        return reply

    async def charge(self, key: ClientKey | None, tokens: int, cost_usd: float | None) -> None:
        if key is None:
            return
        period = period_id(period_of(key), self._wall())
        micros = self.local.carry.micros(f"{key.name}:{period}", cost_usd)
        self.local.add(key, tokens, period, micros)
        tpm = key.tpm or -1
        if not micros and (tpm < 0 or not tokens):
            return
        self._ledger.add(key.name, period, micros)
        self._ledger.tpm[key.name] = tpm
        if not self.up or not await self._write(key.name, period, micros, (tokens, tpm)):
            self._ledger.hold(key.name, period, micros, tokens)

    async def _write(self, name: str, period: str, micros: int, tokens: tuple[int, int]) -> bool:
        """False when the charge is not written and not held either (the caller holds it)."""
        held = False
        try:
            async with asyncio.timeout(self._timeout):
                usage = (tokens[0], tokens[1], micros, retain_seconds(period))
                if await self._remote.charge(name, self._epochs.get(name, ""), period, usage):
                    return True
                self._ledger.hold(name, period, micros, tokens[0])  # Redis lost its state:
                held = True  # write back all this process charged, this one with it
                await self._sync(name, tokens[1])
        except (StoreDown, TimeoutError) as exc:
            self._down(exc)
        return held

    async def _sync(self, name: str, tpm: int) -> None:
        """Writes back what is held for `name` (everything, if Redis lost it)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            taken = self._ledger.take(name)
            spends = [
                (p, full, held, retain_seconds(p))
                for p, full, held in self._ledger.spends(name, taken)
            ]
            # A new epoch each time: one this process set before a restart must not match
            # again, or processes that knew it would take the emptied Redis for the same one.
            epochs = (self._epochs.get(name, ""), secrets.token_hex(8))
            try:
                self._epochs[name] = await self._remote.sync(
                    name, epochs, (tpm, taken.tokens), spends
                )
            except BaseException:
                self._ledger.restore(name, taken)
                raise

    async def spend(self, keys: Sequence[ClientKey]) -> dict[str, float]:
        """Called every few seconds for /metrics. The same read tells whether Redis lost
        the state of a key this process charged (its epoch changed): then, and for charges
        still held, it writes back (`resync`)."""
        if self.up:
            now = self._wall()
            wanted = [(key.name, period_id(period_of(key), now)) for key in keys]
            charged = self._ledger.names()
            try:
                async with asyncio.timeout(self._timeout):
                    values, epochs = await self._remote.spent_and_epochs(wanted, charged)
            except (StoreDown, TimeoutError) as exc:
                self._down(exc)
            else:
                await self.resync(
                    [n for n, e in zip(charged, epochs, strict=True) if e != self._epochs.get(n)]
                )
                return {
                    name: micros / MICROS for (name, _), micros in zip(wanted, values, strict=True)
                }
        return await self.local.spend(keys)

    async def resync(self, names: Sequence[str] | None = None) -> None:
        """Writes back what is held, and everything this process charged to `names` (None:
        to every key, as after an outage); one script per key, none when all is in order."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self._sync_each(self._ledger.names() if names is None else names)
        except (StoreDown, TimeoutError) as exc:
            self._down(exc)

    async def _sync_each(self, names: Sequence[str]) -> None:
        for name in dict.fromkeys([*names, *self._ledger.pending_names()]):
            await self._sync(name, self._ledger.tpm.get(name, -1))

    def _down(self, exc: BaseException) -> None:
        self._on_error()
        if self.up:
            self.up = False
            self._on_transition(False, type(exc).__name__)
            self._probe = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._remote.ping()
                    await self._sync_each(self._ledger.names())  # Redis may have lost all
            except (StoreDown, TimeoutError):
                self._on_error()
                continue
            self.up = True
            self._on_transition(True, "")
            return

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._remote.aclose()
