"""Fleet state: what every sluicegate process must agree on, kept in Redis when `state.url`
is set, else in the process (`LocalStore`, exact for one process, as before).

What is shared, and the consistency each limit gives:

- **rpm and tpm** (per client key): token buckets updated by one Lua script per request on
  the Redis server's clock, so the whole fleet takes from one bucket. Exact: concurrent
  requests from any number of processes never both take the last token. tpm is charged with
  the real usage when a request ends (as before), so requests admitted while the bucket was
  above zero can overdraw it by their own usage; the charge reaches Redis within
  FLUSH_SECONDS (20 ms, see below).
- **Budgets** (USD per UTC day, UTC month or in total): spend is kept in integer
  micro-dollars and added atomically when a request ends; admission compares it with the
  budget in the same script as the buckets (one round trip). Overshoot is bounded by the
  requests already in flight when the budget runs out, each charged what it really cost,
  plus those that ended within the last FLUSH_SECONDS in each process (their charges are
  written behind, below). A process holds back less than one micro-dollar of
  rounding per key (`Carry`).
- **Upstream health** (see `proxy.fleet.health`): consecutive failures, cooldowns and the
  learnt "rejects stream_options" are shared within a refresh interval.
- **Which upstream created each Responses API response** (`proxy.fleet.owners`): one SET
  per response (in the background), one GET when a process does not know an id.

Round trips to Redis, for sizing: a request with a limited key costs 1 on its way in (the
admission script before it goes upstream; a key without rpm, tpm or budget skips it) and at
most 1 when it ends: charges are written behind, every key's charges of the last
FLUSH_SECONDS (20 ms) in one script per key, so a process sends a busy key at most 50 charge
scripts a second however many requests end; a process's first request for a key costs 1
more (it learns the key's epoch). In the background each process runs 1 script every
REFRESH_SECONDS (0.25 s, upstream health) and 1 MGET every SPEND_SECONDS (2 s, spend for
/metrics); a failed upstream attempt adds 1, sent without the request waiting for it.

While Redis cannot be reached (down, slower than `state.timeout`, restarted empty), see
`proxy.fleet.shared`: `open` goes on with each process's own buckets, `closed` refuses keys
that need the store; charges are kept until Redis confirms them and written idempotently,
so spend still equals the bill (a Redis restarted empty loses what exited processes charged).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from proxy.config import Config, StateSettings
from proxy.fleet.health import FleetHealth
from proxy.fleet.local import LocalStore
from proxy.fleet.owners import FleetOwners, Found, LocalOwners, Owner
from proxy.fleet.periods import period_of
from proxy.fleet.shared import FleetStore, Transition
from proxy.fleet.store import Store
from proxy.health import Health

SPEND_SECONDS = 2.0  # how often each process reads the keys' spend for /metrics
SpendReport = Callable[[dict[str, float], dict[str, str]], None]

__all__ = [
    "Fleet",
    "FleetOwners",
    "FleetStore",
    "Found",
    "LocalOwners",
    "LocalStore",
    "Owner",
    "Store",
    "open_fleet",
]


class Fleet:
    """One process's state store, its shared upstream health, and their background tasks."""

    def __init__(
        self, store: Store, health: FleetHealth | None = None, owners: LocalOwners | None = None
    ) -> None:
        self.store, self.health = store, health
        self.owners = owners or LocalOwners()  # who created each Responses API response
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        """Readies the shared store's connections, before requests (bounded; never raises)."""
        if isinstance(self.store, FleetStore):
            await self.store.open()

    def start(self, config: Callable[[], Config], report: SpendReport) -> None:
        self._tasks.append(asyncio.ensure_future(self._watch_spend(config, report)))
        if self.health is not None:
            self._tasks.append(asyncio.ensure_future(self.health.watch(config)))

    async def _watch_spend(self, config: Callable[[], Config], report: SpendReport) -> None:
        """Reports every configured key's spend this period, every SPEND_SECONDS."""
        while True:
            keys = config().keys
            if keys:
                spent = await self.store.spend(keys)  # never raises: the store falls back
                report(spent, {key.name: period_of(key) for key in keys})
            await asyncio.sleep(SPEND_SECONDS)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.health is not None:
            await self.health.aclose()
        await self.owners.aclose()
        await self.store.aclose()


def open_fleet(
    settings: StateSettings,
    health: Health,
    on_transition: Transition,
    on_error: Callable[[], None],
) -> Fleet:
    """Redis-backed state for `settings.url`, and `health` shared through it. No connection
    is made here: `Fleet.open` makes them, and a Redis that is down at start-up is handled
    like one that went down."""
    from proxy.fleet.remote import RedisState  # noqa: PLC0415  # Redis only with `state.url`

    remote = RedisState(settings)
    store = FleetStore(remote, settings, on_transition=on_transition, on_error=on_error)
    health.shared = FleetHealth(remote, health, settings.timeout, lambda: store.up)
    owners = FleetOwners(remote, settings.timeout, lambda: store.up)
    return Fleet(store, health.shared, owners)
