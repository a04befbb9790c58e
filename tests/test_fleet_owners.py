"""Who created each Responses API response, kept in the process (pure, no event loop for the
LRU and its expiry) and behind a shared store that may be away."""

from __future__ import annotations

import asyncio

from proxy.fleet.owners import OWNER_SECONDS, FleetOwners, Found, LocalOwners, Owner
from proxy.fleet.store import StoreDown

ONE = Owner("one", "bot", "team-a")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_owner_is_found_until_it_expires() -> None:
    clock = Clock()
    owners = LocalOwners(clock=clock)
    owners.remember("resp_1", ONE)
    assert owners.local("resp_1") == ONE
    clock.now = OWNER_SECONDS + 1
    assert owners.local("resp_1") is None


def test_the_least_recently_used_id_goes_first() -> None:
    owners = LocalOwners(kept=2)
    owners.remember("a", ONE)
    owners.remember("b", ONE)
    assert owners.local("a") == ONE  # a is used: b is now the oldest
    owners.remember("c", ONE)
    assert (owners.local("a"), owners.local("b"), owners.local("c")) == (ONE, None, ONE)


def test_an_owner_round_trips_through_its_stored_text() -> None:
    assert Owner.loads(ONE.dumps()) == ONE
    assert Owner.loads(Owner("one", "bot", None).dumps()) == Owner("one", "bot", None)
    for broken in ("", "[1, 2]", '["x"]', "{"):
        assert Owner.loads(broken) is None


class FakeRemote:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.down = False

    def response_key(self, response_id: str) -> str:
        return "p:responses:" + response_id

    async def get_value(self, key: str) -> str | None:
        if self.down:
            raise StoreDown("ConnectionError")
        return self.values.get(key)

    async def set_value(self, key: str, value: str, seconds: int) -> None:
        assert seconds == OWNER_SECONDS
        self.values[key] = value

    async def delete_value(self, key: str) -> None:
        self.values.pop(key, None)


def test_fleet_owners_share_through_the_store_and_say_when_it_is_away() -> None:
    async def run() -> None:
        remote = FakeRemote()
        here, there = FleetOwners(remote, 0.5, lambda: True), FleetOwners(remote, 0.5, lambda: True)
        here.remember("resp_1", ONE)
        await here.aclose()  # the background write landed
        assert await there.find("resp_1") == Found(ONE)
        remote.down = True
        assert await there.find("resp_2") == Found(None, partial=True)
        assert await here.find("resp_1") == Found(ONE)  # its own, without asking
        remote.down = False
        await there.forget("resp_1")
        await there.aclose()
        assert remote.values == {}

    asyncio.run(run())
