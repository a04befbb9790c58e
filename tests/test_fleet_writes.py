"""Charges written to a real redis-server are counted exactly once: a write whose reply came
after `state.timeout`, writes in flight while Redis lost its state, a write whose request was
cancelled, and what is pending when the process closes. And a burst on a fresh store does
not take Redis for down."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from proxy.config import Budget, ClientKey, Secret, StateSettings
from proxy.fleet import FleetStore
from proxy.fleet.remote import POOL_SIZE, RedisState
from proxy.fleet.shared import FLUSH_SECONDS, PROBE_SECONDS
from tests.helpers import until
from tests.redis_server import RedisServer

PASSWORD = "fleet-writes-test-pass"
TIMEOUT = 0.05
# Keeps Redis's one thread busy for ARGV[1] µs: calls queued behind it run after it, so a
# charge sent meanwhile may be applied after its caller gave up waiting.
BUSY = """local t = redis.call('TIME'); local t0 = t[1] * 1e6 + t[2]
while true do
  local n = redis.call('TIME')
  if n[1] * 1e6 + n[2] - t0 > tonumber(ARGV[1]) then return 1 end
end"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(PASSWORD) as running:
        yield running


def _key(name: str) -> ClientKey:
    return ClientKey(name, "0" * 64, rpm=100_000, budget=Budget(1000.0, "total"))


def _store(server: RedisServer, transitions: list[tuple[bool, str]] | None = None) -> FleetStore:
    settings = StateSettings(Secret(server.url), "test:", "open", TIMEOUT)
    seen = [] if transitions is None else transitions
    return FleetStore(
        RedisState(settings), settings, on_transition=lambda up, why: seen.append((up, why))
    )


def _spend(server: RedisServer, name: str) -> int:
    with server.client() as client:
        return int(client.get(f"test:{{{name}}}:spend:total") or 0)


def test_a_charge_applied_after_its_timeout_is_counted_once(server: RedisServer) -> None:
    """Redis busy for about the timeout: the charge queued behind it runs, but its reply
    may come too late; the write-back after recovery must not add it again."""

    async def trial(busy_us: int) -> tuple[int, bool]:
        name = f"k{busy_us}"
        store = _store(server)
        await store.admit(_key(name))  # the epoch is learnt
        with server.client() as client:
            busy = threading.Thread(target=client.eval, args=(BUSY, 0, busy_us))
            busy.start()
            await asyncio.sleep(0.005)  # the busy script has started
            await store.charge(_key(name), 10, 1.0)
            await store.flush()  # sent now, behind the busy script
            await asyncio.to_thread(busy.join)
        recovered = await until(lambda: store.up, 5 * PROBE_SECONDS + 2)
        await store.spend([_key(name)])  # the periodic read: writes back what is pending
        await store.charge(_key(name), 10, 0.5)
        await store.aclose()
        return _spend(server, name), recovered

    async def run() -> list[tuple[int, bool]]:
        return [await trial(busy) for busy in range(40_000, 62_000, 2_000)]

    results = asyncio.run(run())
    assert results == [(1_500_000, True)] * len(results)  # $1.00 + $0.50, never $2.50


def test_charges_in_flight_while_redis_lost_its_state_are_counted_once(
    server: RedisServer,
) -> None:
    async def run() -> None:
        store = _store(server)
        await store.charge(_key("burst"), 1, 0.000001)
        with server.client() as client:
            client.flushall()  # no call fails: every charge below finds the epoch gone
        await asyncio.gather(*(store.charge(_key("burst"), 1, 0.000002) for _ in range(20)))
        await store.aclose()

    asyncio.run(run())
    assert _spend(server, "burst") == 1 + 20 * 2  # the first written again once, with them


def test_a_cancelled_request_still_writes_its_charge(server: RedisServer) -> None:
    """The store writes charges in its own task: a request cancelled after charging, while
    that write is in flight, does not cut it short."""

    async def charge_and_wait(store: FleetStore) -> None:
        await store.charge(_key("gone"), 10, 0.25)
        await asyncio.sleep(10)

    async def run() -> None:
        store = _store(server)
        await store.admit(_key("gone"))
        server.pause()  # the write is in flight when the request is cancelled
        request = asyncio.ensure_future(charge_and_wait(store))
        await asyncio.sleep(FLUSH_SECONDS + 0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        server.resume()
        await store.aclose()

    asyncio.run(run())
    assert _spend(server, "gone") == 250_000


def test_closing_writes_back_what_is_pending(server: RedisServer) -> None:
    """Charged while Redis was down; it returns (empty) and the process stops before its
    probe found it: the last write-back at close still lands."""

    async def run() -> bool:
        store = _store(server)
        await store.charge(_key("late"), 1, 0.000003)
        await store.flush()
        server.kill()
        await store.charge(_key("late"), 1, 0.000004)
        await store.flush()  # marks the store down; kept
        server.start()
        down = not store.up
        await store.aclose()  # well before PROBE_SECONDS
        return down

    assert asyncio.run(run())
    assert _spend(server, "late") == 7


def test_a_burst_on_a_fresh_store_keeps_it_up_on_a_bounded_pool(server: RedisServer) -> None:
    async def run() -> tuple[bool, list[tuple[bool, str]], int]:
        transitions: list[tuple[bool, str]] = []
        store = _store(server, transitions)
        await asyncio.gather(*(store.admit(_key(f"team-{i % 2}")) for i in range(100)))
        with server.client() as client:
            connections = len(client.client_list()) - 1  # less this one
        up = store.up
        await store.aclose()
        return up, transitions, connections

    up, transitions, connections = asyncio.run(run())
    assert (up, transitions) == (True, [])
    assert connections <= POOL_SIZE


def test_an_opened_store_has_its_connections_before_the_first_request(
    server: RedisServer,
) -> None:
    async def run() -> int:
        store = _store(server)
        await store.open()
        with server.client() as client:
            connections = len(client.client_list()) - 1
        await store.aclose()
        return connections

    assert asyncio.run(run()) == POOL_SIZE


def test_charges_are_written_together_one_script_per_key(server: RedisServer) -> None:
    """`charge` returns without a round trip; the charges that end within FLUSH_SECONDS of the
    first are written together: one script per key, however many requests ended."""

    def scripts_run() -> int:
        with server.client() as client:
            return int(client.info("commandstats")["cmdstat_evalsha"]["calls"])

    async def run() -> tuple[int, int, bool]:
        store = _store(server)
        for name in ("one", "two"):
            await store.admit(_key(name))  # the epochs are learnt
        before = scripts_run()
        for i in range(30):
            await store.charge(_key(("one", "two")[i % 3 == 0]), 1, 0.000005)
        unwritten = _spend(server, "one") == 0
        await asyncio.sleep(FLUSH_SECONDS)
        assert await until(lambda: (_spend(server, "one"), _spend(server, "two")) == (100, 50), 2)
        written = scripts_run() - before
        await store.aclose()
        return written, unwritten

    assert asyncio.run(run()) == (2, True)  # 20 charges to `one` and 10 to `two`: 2 scripts


def test_an_admission_after_redis_lost_its_scripts_loads_them_again(server: RedisServer) -> None:
    async def run() -> tuple[bool, list[tuple[bool, str]]]:
        transitions: list[tuple[bool, str]] = []
        store = _store(server, transitions)
        await store.open()
        await store.admit(_key("scripts"))
        with server.client() as client:
            client.script_flush()
        await store.admit(_key("scripts"))  # NOSCRIPT: loaded, then sent again
        up = store.up
        await store.aclose()
        return up, transitions

    assert asyncio.run(run()) == (True, [])
    with server.client() as client:
        assert client.hget("test:{scripts}:rpm", "level") is not None
