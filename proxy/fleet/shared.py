"""`FleetStore`: limits and budgets in Redis, shared by every process that points at it, and
what happens while Redis cannot be reached.

Each call is bounded by `state.timeout`; connection setup is not part of it (`open` readies
the pool first, see `proxy.fleet.remote`). A call that fails marks the store down (one
`on_transition` call, so one log line, not one per request); one that times out does too,
unless Redis answered another call meanwhile (then the wait was this process's own queue, a
burst, and only that request falls back). While down, requests do not wait on Redis at all:
`open` admits them on this process's own buckets and the spend last seen plus its own
charges; `closed` refuses keys with limits or a budget (503). A background probe pings every
PROBE_SECONDS; when Redis answers, what is pending is written back, and the store is up again.

Charges are written behind: `charge` records one and returns, and FLUSH_SECONDS after the
first charge since the last write, every key charged meanwhile is written, one script per
key (the ledger's running totals carry all its charges at once). So the time to first token
waits on one round trip (admission) and a busy key costs about one round trip per request
instead of two; a budget or tpm bucket sees a charge up to FLUSH_SECONDS later.

Every charge is recorded in the process (`Ledger`) before it is written, and writes are
idempotent (running totals, see `proxy.fleet.scripts`): a write that timed out, was cancelled
or failed stays pending and is sent again, and one that did land after all is not counted
twice. A write runs in a task of the store's, never the request's, and `aclose` makes one
last bounded write-back. A Redis restarted empty is told by its missing per-key epoch: each
process then writes back everything it charged, so the spend again equals the bill, except
what processes that have exited charged (and, for day and month budgets, anything before the
previous period).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING

from proxy.config import ClientKey, StateSettings
from proxy.errors import StateUnavailable
from proxy.fleet.ledger import Charged, Ledger
from proxy.fleet.local import Clock, LocalStore
from proxy.fleet.periods import MICROS, budget_micros, period_id, period_of
from proxy.fleet.scripts import MISMATCH
from proxy.fleet.store import ADMITTED, StoreDown, refusal

if TYPE_CHECKING:  # the type only: Redis is imported when `state.url` is set
    from proxy.fleet.remote import RedisState

PROBE_SECONDS = 0.5
# Charges are written this long after the first one since the last write, all at once: a
# process sends a key one charge script per FLUSH_SECONDS, however many requests ended.
FLUSH_SECONDS = 0.02
PROBE_TIMEOUT = 1.0  # a probe writes back pending charges: more than one round trip
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
        flush_after: float = FLUSH_SECONDS,
    ) -> None:
        self.local = LocalStore(wall=wall)  # the fallback, and a mirror of the spend seen
        self.up = True
        self._remote, self._wall = remote, wall
        self._timeout, self._closed = settings.timeout, settings.on_unavailable == "closed"
        self._on_transition, self._on_error = on_transition, on_error
        self._ledger = Ledger()
        self._epochs: dict[str, str] = {}  # per key name, as last seen in Redis
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._dirty: dict[tuple[str, str], None] = {}  # (key name, period) charged, unwritten
        self._flushing: asyncio.Task[None] | None = None
        self._flush_after = flush_after
        self._probe: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._opened = self._closing = False

    async def open(self) -> None:
        """Readies the connection pool: in the lifespan, before requests, or else at the
        first call, outside its timeout (concurrent first calls wait for the one opening).
        A Redis away at start-up is handled like one that went down."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self._remote.open()
        except (StoreDown, TimeoutError) as exc:
            self._down(exc)
        finally:
            self._opened = True

    async def admit(self, key: ClientKey | None) -> None:
        if key is None or not key.limited:
            return
        if not self._opened:
            await self.open()
        if self.up:
            now, started = self._wall(), time.monotonic()
            period = period_id(period_of(key), now)
            try:
                async with asyncio.timeout(self._timeout):
                    verdict, wait, spent = await self._admit(key, period)
            except (StoreDown, TimeoutError) as exc:
                self._failed(exc, started)
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
        name = key.name
        if name not in self._epochs:  # first use: learn the epoch (concurrent calls wait once)
            await self._sync(name, None)
        epoch = self._epochs[name]
        reply = await self._remote.admit(name, epoch, period, limits)
        if reply[0] == MISMATCH:
            await self._sync(name, epoch)
            reply = await self._remote.admit(name, self._epochs[name], period, limits)
        return reply

    async def charge(self, key: ClientKey | None, tokens: int, cost_usd: float | None) -> None:
        """Records the charge (so it is never lost) and returns: the write follows within
        `flush_after`, together with every other charge to the same key meanwhile."""
        if key is None:
            return
        period = period_id(period_of(key), self._wall())
        micros = self.local.carry.micros(key.name, period, cost_usd)
        self.local.add(key, tokens, period, micros)
        tpm = key.tpm or -1
        if not micros and (tpm < 0 or not tokens):
            return
        self._ledger.add(key.name, period, micros, tokens if tpm > 0 else 0, tpm)
        self._dirty[key.name, period] = None
        if self._flushing is None:
            self._flushing = self._spawn(self._flush_later())

    def _spawn(self, write: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """A write of the store's own, which no request's cancellation can cut short."""
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_after)
        self._flushing = None  # charges from now on are for the next flush
        await self.flush()

    async def flush(self) -> None:
        """Writes the charges recorded since the last flush now: one script per key and
        period, sent together. While Redis is down they stay pending (the probe writes them)."""
        dirty, self._dirty = self._dirty, {}
        if not self._opened:
            await self.open()
        if self.up and dirty:
            await asyncio.gather(*(self._write(name, period) for name, period in dirty))

    async def _write(self, name: str, period: str) -> None:
        """Writes `name`'s running totals; if that fails they stay pending in the ledger."""
        charged = self._ledger.get(name) or Charged()
        tokens, micros = charged.tokens, charged.micros.get(period, 0)  # what is sent
        epoch, started = self._epochs.get(name), time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                if await self._remote.charge(name, epoch or "", period, charged):
                    self._ledger.confirm(name, tokens, {period: micros})
                else:  # Redis lost its state: write back all this process charged
                    await self._sync(name, epoch)
        except (StoreDown, TimeoutError) as exc:
            self._failed(exc, started)

    async def _sync(self, name: str, seen: str | None) -> None:
        """Writes all `name`'s running totals, and learns its epoch. `seen`: the epoch the
        caller found out of date (None: never learnt); if another call has learnt a new one
        meanwhile and nothing is pending, there is nothing left to do."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            charged = self._ledger.get(name) or Charged()
            if self._epochs.get(name) != seen:
                if not charged.pending():
                    return
                seen = self._epochs.get(name)
            # A new epoch each time: one this process set before a restart must not match
            # again, or processes that knew it would take the emptied Redis for the same one.
            epochs = (seen or "", secrets.token_hex(8))
            sent = (charged.tokens, dict(charged.micros))
            self._epochs[name] = await self._remote.sync(name, epochs, charged)
            if self._ledger.get(name) is not None:
                self._ledger.confirm(name, *sent)

    async def spend(self, keys: Sequence[ClientKey]) -> dict[str, float]:
        """Called every few seconds for /metrics. The same read tells whether Redis lost
        the state of a key this process charged (its epoch changed): then, and for charges
        still pending, it writes back (`resync`)."""
        if self.up:
            now, started = self._wall(), time.monotonic()
            wanted = [(key.name, period_id(period_of(key), now)) for key in keys]
            charged = self._ledger.names()
            try:
                async with asyncio.timeout(self._timeout):
                    values, epochs = await self._remote.spent_and_epochs(wanted, charged)
            except (StoreDown, TimeoutError) as exc:
                self._failed(exc, started)
            else:
                await self.resync(
                    [n for n, e in zip(charged, epochs, strict=True) if e != self._epochs.get(n)]
                )
                return {
                    name: micros / MICROS for (name, _), micros in zip(wanted, values, strict=True)
                }
        return await self.local.spend(keys)

    async def resync(self, names: Sequence[str] | None = None) -> None:
        """Writes back what is pending, and everything this process charged to `names`
        (None: to every key, as after an outage); one script per key, none when all is in
        order."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self._sync_each(self._ledger.names() if names is None else names)
        except (StoreDown, TimeoutError) as exc:
            self._down(exc)

    async def _sync_each(self, names: Sequence[str]) -> None:
        for name in dict.fromkeys([*names, *self._ledger.pending_names()]):
            await self._sync(name, self._epochs.get(name))

    def _failed(self, exc: BaseException, started: float) -> None:
        """A timeout marks the store down only if Redis answered nothing while this call
        waited: one that other calls' replies overtook was slowed on this side (a burst
        queued in this process), not by Redis; that request alone falls back."""
        if isinstance(exc, TimeoutError) and self._remote.answered > started:
            self._on_error()
        else:
            self._down(exc)

    def _down(self, exc: BaseException) -> None:
        self._on_error()
        if self.up and not self._closing:
            self.up = False
            self._on_transition(False, type(exc).__name__)
            self._probe = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._remote.open()
                    await self._sync_each(self._ledger.names())  # Redis may have lost all
            except (StoreDown, TimeoutError):
                self._on_error()
                continue
            self.up = True
            self._on_transition(True, "")
            return

    async def aclose(self) -> None:
        """Lets the writes in flight land, then makes one last write-back of what is pending
        (Redis may be back before the probe found it), within PROBE_TIMEOUT."""
        self._closing = True
        for task in (self._opening, self._probe, self._flushing):  # what it would flush is pending
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT):
                await asyncio.gather(*self._writes)
                for _ in range(2):  # a connection broken while Redis was away fails once
                    with contextlib.suppress(StoreDown):
                        await self._sync_each(())
                        break
        await self._remote.aclose()
