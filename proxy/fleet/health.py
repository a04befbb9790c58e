"""Upstream health shared by the fleet, on top of each process's own `proxy.health.Health`.

The happy path pays nothing: a successful attempt sends no round trip unless failures are
known to be counted for that upstream. What is shared, and how:

- **Failures and cooldown.** Each failed attempt is reported in the background (a task, not
  awaited by the request) to a Lua script that counts consecutive failures fleet-wide and,
  at the upstream's `cooldown.failures`, opens a cooldown of `cooldown.seconds` as a key
  with that expiry. A success resets the count (when one is known).
- **Learning.** Every REFRESH_SECONDS each process reads, in one script, every upstream's
  count, cooldown time left and "rejects stream_options" flag (writing, in the same call, a
  flag it has just learnt itself, once). A cooldown found there opens the local circuit for
  the time left, so within one refresh of the `failures`-th failure anywhere, every process
  skips the upstream. The flag lives a day in Redis; when it expires, every process that
  shared it forgets it, so an upstream that has started to accept the field is tried again
  (and learnt again, once, if it still refuses it).
- **Probes.** When a cooldown ends, each process lets one probe through (at most one per
  process, not one per fleet); a probe that fails opens the cooldown again for everyone,
  one that succeeds closes it where it ran and resets the shared count.

While the state store is down nothing is sent and each process keeps its own health.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from proxy.config import Config, Cooldown, Upstream
from proxy.fleet.store import StoreDown
from proxy.health import Health

if TYPE_CHECKING:  # the type only: Redis is imported when `state.url` is set
    from proxy.fleet.remote import RedisState

REFRESH_SECONDS = 0.25


class FleetHealth:
    def __init__(
        self, remote: RedisState, health: Health, timeout: float, up: Callable[[], bool]
    ) -> None:
        self._remote, self._health, self._timeout, self._up = remote, health, timeout, up
        self._counted: set[str] = set()  # upstreams with failures counted somewhere
        self._flagged: set[str] = set()  # "rejects stream_options" shared with the fleet
        self._tasks: set[asyncio.Task[None]] = set()

    # --- told by Health, on the request path: schedule, never wait --------------------------

    def succeeded(self, name: str) -> None:
        if name in self._counted:
            self._counted.discard(name)
            self._spawn(self._remote.upstream_succeeded(name))

    def failed(self, name: str, policy: Cooldown, probe: bool) -> None:
        self._counted.add(name)
        ms = max(1, round(policy.seconds * 1000))
        self._spawn(self._report(name, policy.failures, ms, probe))

    async def _report(self, name: str, failures: int, ms: int, probe: bool) -> None:
        if await self._remote.upstream_failed(name, failures, ms, probe):
            self._health.open_shared(name, time.monotonic(), ms / 1000, ms / 1000)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if not self._up():
            work.close()  # never started: nothing to share while the store is down
            return
        task = asyncio.ensure_future(self._bounded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bounded(self, work: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(StoreDown, TimeoutError):
            async with asyncio.timeout(self._timeout * 4):
                await work

    # --- the refresh loop -------------------------------------------------------------------

    async def watch(self, config: Callable[[], Config]) -> None:
        """Learns the fleet's view every REFRESH_SECONDS, for ever."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            if self._up():
                with contextlib.suppress(StoreDown, TimeoutError):
                    async with asyncio.timeout(self._timeout * 4):
                        await self.refresh(config().upstreams.values())

    async def refresh(self, upstreams: Iterable[Upstream]) -> None:
        ups = list(upstreams)
        learnt = [(u.name, self._learnt_here(u.name)) for u in ups]
        states = await self._remote.upstream_states(learnt)
        now = time.monotonic()
        for upstream, (failures, left_ms, rejects) in zip(ups, states, strict=True):
            name = upstream.name
            if failures:
                self._counted.add(name)
            if left_ms > 0:
                self._health.open_shared(name, now, left_ms / 1000, upstream.cooldown.seconds)
            self._share_flag(name, rejects)

    def _learnt_here(self, name: str) -> bool:
        """Learnt by this process since the fleet last told it: to be written, once."""
        return self._health[name].rejects_stream_options and name not in self._flagged

    def _share_flag(self, name: str, rejects: bool) -> None:
        if rejects:
            self._flagged.add(name)
            self._health[name].rejects_stream_options = True
        elif name in self._flagged:  # expired fleet-wide: try the field again
            self._flagged.discard(name)
            self._health[name].rejects_stream_options = False

    async def flush(self) -> None:
        """Waits for the reports in flight to land (or fail)."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
