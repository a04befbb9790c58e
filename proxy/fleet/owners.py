"""Which upstream created a Responses API response: what `GET /v1/responses/{id}` (and
`DELETE`, `.../input_items`, `.../cancel`, and a later request's `previous_response_id`)
must go back to.

`LocalOwners` keeps it in this process: a bounded LRU (OWNERS_KEPT ids, about 200 bytes
each) whose entries expire after OWNER_SECONDS. `FleetOwners` also writes each one to
Redis (`{prefix}responses:{id}`, with the same TTL) so any process of the fleet finds it;
while Redis cannot be reached it uses its local copy alone and says so (`Found.partial`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from proxy.fleet.store import StoreDown

OWNERS_KEPT = 100_000  # ids per process (about 20 MB at most)
OWNER_SECONDS = 30 * 24 * 3600  # OpenAI keeps a stored response 30 days


@dataclass(frozen=True, slots=True)
class Owner:
    upstream: str  # its name in the config
    route: str  # the route's model name the client asked for
    key: str | None  # the client key that created it (None: an open proxy)

    def dumps(self) -> str:
        return orjson.dumps([self.upstream, self.route, self.key]).decode()

    @classmethod
    def loads(cls, text: str) -> Owner | None:
        try:
            upstream, route, key = orjson.loads(text)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        return cls(upstream, route, key) if isinstance(upstream, str) else None


@dataclass(frozen=True, slots=True)
class Found:
    owner: Owner | None
    partial: bool = False  # the fleet's store could not be asked: only this process's records


class LocalOwners:
    def __init__(self, kept: int = OWNERS_KEPT, clock: Callable[[], float] = time.monotonic):
        self._kept, self._clock = kept, clock
        self._owners: OrderedDict[str, tuple[Owner, float]] = OrderedDict()

    def remember(self, response_id: str, owner: Owner) -> None:
        self._owners[response_id] = (owner, self._clock() + OWNER_SECONDS)
        self._owners.move_to_end(response_id)
        if len(self._owners) > self._kept:
            self._owners.popitem(last=False)

    async def find(self, response_id: str) -> Found:
        return Found(self.local(response_id))

    def local(self, response_id: str) -> Owner | None:
        entry = self._owners.get(response_id)
        if entry is None:
            return None
        if entry[1] < self._clock():
            del self._owners[response_id]
            return None
        self._owners.move_to_end(response_id)
        return entry[0]

    async def forget(self, response_id: str) -> None:
        self._owners.pop(response_id, None)

    async def aclose(self) -> None:
        return None


class Remote(Protocol):
    """What `FleetOwners` needs of `fleet.remote.RedisState`."""

    async def get_value(self, key: str) -> str | None: ...
    async def set_value(self, key: str, value: str, seconds: int) -> None: ...
    async def delete_value(self, key: str) -> None: ...
    def response_key(self, response_id: str) -> str: ...


class FleetOwners(LocalOwners):
    """`LocalOwners`, written through to Redis in the background (a request never waits for
    the write) and read from it when this process does not know an id."""

    def __init__(self, remote: Remote, timeout: float, up: Callable[[], bool]) -> None:
        super().__init__()
        self._remote, self._timeout, self._up = remote, timeout, up
        self._writes: set[asyncio.Task[None]] = set()

    def remember(self, response_id: str, owner: Owner) -> None:
        super().remember(response_id, owner)
        if self._up():
            key = self._remote.response_key(response_id)
            self._spawn(self._remote.set_value(key, owner.dumps(), OWNER_SECONDS))

    def _spawn(self, call: Awaitable[None]) -> None:
        task = asyncio.ensure_future(self._bounded(call))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _bounded(self, call: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await call
        except (StoreDown, TimeoutError):
            pass  # this process still knows it; the others will say they do not

    async def find(self, response_id: str) -> Found:
        owner = self.local(response_id)
        if owner is not None:
            return Found(owner)
        if not self._up():
            return Found(None, partial=True)
        try:
            async with asyncio.timeout(self._timeout):
                text = await self._remote.get_value(self._remote.response_key(response_id))
        except (StoreDown, TimeoutError):
            return Found(None, partial=True)
        return Found(Owner.loads(text) if text is not None else None)

    async def forget(self, response_id: str) -> None:
        await super().forget(response_id)
        if self._up():
            self._spawn(self._remote.delete_value(self._remote.response_key(response_id)))

    async def aclose(self) -> None:
        """Lets the writes in flight land (each is bounded)."""
        await asyncio.gather(*self._writes, return_exceptions=True)
