"""proxy.fleet against a real redis-server: two FleetStores stand for two processes. rpm,
tpm and budgets hold across both; Redis down, slow or restarted empty neither blocks a call
past `timeout` nor loses a charge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from proxy.config import Budget, ClientKey, Secret, StateSettings
from proxy.errors import BudgetExceeded, RateLimited, StateUnavailable
from proxy.fleet import FleetStore
from proxy.fleet.remote import POOL_SIZE, RedisState
from proxy.fleet.shared import FLUSH_SECONDS, PROBE_SECONDS
from tests.helpers import until
from tests.redis_server import RedisServer

PASSWORD = "fleet-store-test-pass"
TIMEOUT = 0.05
RPM = ClientKey("rpm", "0" * 64, rpm=5)
TPM = ClientKey("tpm", "1" * 64, tpm=100)
SPENDER = ClientKey("spender", "2" * 64, budget=Budget(0.001, "total"))  # 1000 micro-USD
DAILY = ClientKey("daily", "3" * 64, budget=Budget(0.001, "day"))
OPEN = ClientKey("open", "4" * 64)  # no limits: admission never asks the store


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(PASSWORD) as running:
        yield running


class Fleet:
    """Stores sharing one Redis, with their transitions and error counts."""

    def __init__(
        self, server: RedisServer, mode: str = "open", count: int = 2, timeout: float = TIMEOUT
    ) -> None:
        settings = StateSettings(Secret(server.url), "test:", mode, timeout)  # type: ignore[arg-type]
        self.transitions: list[tuple[bool, str]] = []
        self.errors = 0
        self.stores = [
            FleetStore(
                RedisState(settings),
                settings,
                on_transition=lambda up, why: self.transitions.append((up, why)),
                on_error=self._error,
            )
            for _ in range(count)
        ]

    def _error(self) -> None:
        self.errors += 1

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()


def _spend(server: RedisServer, name: str, period: str = "total") -> int:
    with server.client() as client:
        return int(client.get(f"test:{{{name}}}:spend:{period}") or 0)


def test_requests_per_minute_hold_across_processes(server: RedisServer) -> None:
    async def run() -> tuple[int, list[RateLimited]]:
        fleet = Fleet(server)
        admitted, refused = 0, []
        for i in range(12):
            try:
                await fleet.stores[i % 2].admit(RPM)
                admitted += 1
            except RateLimited as exc:
                refused.append(exc)
        await fleet.aclose()
        return admitted, refused

    admitted, refused = asyncio.run(run())
    assert admitted == 5  # one bucket for both, not five each
    assert len(refused) == 7
    assert all(exc.type == "requests" and 0 < exc.retry_after <= 12 for exc in refused)


def test_a_burst_beyond_the_pool_waits_for_connections_and_never_fails(
    server: RedisServer,
) -> None:
    """More admissions at once than the pool has connections (redis-py's default pool raised
    `MaxConnectionsError` at 100 in use, which marked the store down): each waits its turn."""
    burst = ClientKey("burst", "5" * 64, rpm=1_000_000)

    async def run() -> tuple[list[BaseException | None], int]:
        fleet = Fleet(server, count=1, timeout=5.0)  # the wait, not a slow machine, is tested
        (store,) = fleet.stores
        done = await asyncio.gather(*(store.admit(burst) for _ in range(POOL_SIZE * 8)),
                                    return_exceptions=True)  # fmt: skip
        with server.client() as client:
            connected = int(client.info("clients")["connected_clients"])
        assert (fleet.errors, fleet.transitions, store.up) == (0, [], True)
        await fleet.aclose()
        return done, connected

    done, connected = asyncio.run(run())
    assert done == [None] * (POOL_SIZE * 8)
    assert connected <= POOL_SIZE + 1  # the pool's, and the one asking


def test_tokens_per_minute_are_charged_fleet_wide(server: RedisServer) -> None:
    async def run() -> None:
        fleet = Fleet(server)
        one, two = fleet.stores
        await one.admit(TPM)
        await one.charge(TPM, 250, None)  # overdraws the shared bucket: 100 → -150
        await one.flush()  # now, not FLUSH_SECONDS later
        with pytest.raises(RateLimited) as info:
            await two.admit(TPM)
        assert info.value.type == "tokens"
        assert info.value.retry_after == pytest.approx(151 * 60 / 100, rel=0.01)
        await fleet.aclose()

    asyncio.run(run())


def test_a_budget_is_shared_and_refused_without_naming_amounts(server: RedisServer) -> None:
    async def run() -> BudgetExceeded:
        fleet = Fleet(server)
        one, two = fleet.stores
        await one.admit(SPENDER)
        await two.admit(SPENDER)  # both admitted below the budget: both run, both are charged
        await one.charge(SPENDER, 10, 0.0006)
        await two.charge(SPENDER, 10, 0.0006)
        await asyncio.gather(one.flush(), two.flush())
        with pytest.raises(BudgetExceeded) as info:
            await one.admit(SPENDER)
        await fleet.aclose()
        return info.value

    refused = asyncio.run(run())
    assert _spend(server, "spender") == 1200  # the in-flight overshoot, charged exactly
    assert refused.status == 429
    assert (refused.type, refused.code) == ("insufficient_quota", "budget_exceeded")
    assert refused.headers() == [(b"x-should-retry", b"false")]
    assert refused.message == "The key 'spender' has used its total budget. It does not reset."


def test_a_charge_counts_for_the_fleet_within_the_flush_interval(server: RedisServer) -> None:
    """Charges are written behind: until the flush, another process does not see one, so
    the overshoot bound adds the requests that ended within the last FLUSH_SECONDS."""

    async def run() -> None:
        fleet = Fleet(server)
        one, two = fleet.stores
        await asyncio.gather(one.open(), two.open(), two.admit(SPENDER))  # epoch learnt
        await one.charge(SPENDER, 1, 0.002)  # twice the budget, written behind
        await two.admit(SPENDER)  # sent before the flush: not seen yet
        assert await until(lambda: _spend(server, "spender") == 2000, FLUSH_SECONDS + 2)
        with pytest.raises(BudgetExceeded):
            await two.admit(SPENDER)
        await fleet.aclose()

    asyncio.run(run())


def test_a_daily_budget_names_its_reset(server: RedisServer) -> None:
    async def run() -> str:
        fleet = Fleet(server)
        await fleet.stores[0].charge(DAILY, 1, 0.002)
        await fleet.stores[0].flush()
        with pytest.raises(BudgetExceeded) as info:
            await fleet.stores[1].admit(DAILY)
        await fleet.aclose()
        return info.value.message

    message = asyncio.run(run())
    assert "daily budget. It resets at " in message
    assert message.endswith("T00:00:00Z (UTC).")
    assert "0.00" not in message


def test_fractions_of_a_micro_dollar_are_carried_not_rounded_away(server: RedisServer) -> None:
    async def run() -> None:
        fleet = Fleet(server, count=1)
        for _ in range(10):
            await fleet.stores[0].charge(OPEN, 0, 0.0000056)  # 5.6 micro-USD each
        await fleet.aclose()

    asyncio.run(run())
    assert _spend(server, "open", time.strftime("%Y-%m-%d", time.gmtime())) == 56  # not 60


def test_keys_without_limits_never_wait_on_the_store(server: RedisServer) -> None:
    async def run() -> None:
        fleet = Fleet(server, mode="closed")
        server.pause()
        started = time.monotonic()
        await fleet.stores[0].admit(OPEN)
        await fleet.stores[0].admit(None)
        assert time.monotonic() - started < TIMEOUT
        assert fleet.transitions == []
        server.resume()
        await fleet.aclose()

    asyncio.run(run())


def test_open_mode_admits_while_redis_is_down_and_writes_back_after(
    server: RedisServer,
) -> None:
    async def run() -> Fleet:
        fleet = Fleet(server)
        one, two = fleet.stores
        await one.charge(SPENDER, 1, 0.0001)
        await one.flush()  # written before the crash
        server.kill()
        for store in fleet.stores:
            started = time.monotonic()
            await store.admit(SPENDER)  # admitted on local state
            assert time.monotonic() - started < TIMEOUT + 0.05
            await store.charge(SPENDER, 1, 0.0002)
        await one.admit(RPM)
        assert not one.up
        assert not two.up
        server.start()  # empty: what was charged before the crash must be written again
        assert await until(lambda: one.up and two.up, 5 * PROBE_SECONDS + 2)
        await one.charge(SPENDER, 1, 0.0001)
        await fleet.aclose()
        return fleet

    fleet = asyncio.run(run())
    assert _spend(server, "spender") == 100 + 2 * 200 + 100
    assert fleet.transitions == [(False, "StoreDown")] * 2 + [(True, "")] * 2
    assert fleet.errors >= 2


def test_a_redis_restarted_empty_between_calls_is_refilled(server: RedisServer) -> None:
    async def run() -> None:
        fleet = Fleet(server)
        one, two = fleet.stores
        await one.charge(SPENDER, 1, 0.0003)
        await two.charge(SPENDER, 1, 0.0004)
        server.restart()  # a pooled connection's next call fails once; then all is gone
        await one.admit(SPENDER)  # `one` set the epoch before: it is the first back now
        assert await until(lambda: one.up, 5 * PROBE_SECONDS + 2)
        await two.charge(SPENDER, 1, 0.0001)
        assert await until(lambda: two.up, 5 * PROBE_SECONDS + 2)
        for store in fleet.stores:
            await store.admit(SPENDER)  # each finds the state gone and writes back its part
        await fleet.aclose()

    asyncio.run(run())
    assert _spend(server, "spender") == 800


def test_closed_mode_refuses_limited_keys_while_down(server: RedisServer) -> None:
    async def run() -> None:
        fleet = Fleet(server, mode="closed", count=1)
        store = fleet.stores[0]
        await store.admit(RPM)
        server.kill()
        with pytest.raises(StateUnavailable) as info:
            await store.admit(RPM)
        assert (info.value.status, info.value.code) == (503, "state_unavailable")
        assert info.value.headers() == [(b"retry-after", b"1")]
        await store.admit(OPEN)  # needs nothing from the store
        server.start()
        assert await until(lambda: store.up, 5 * PROBE_SECONDS + 2)
        await store.admit(RPM)
        await fleet.aclose()

    asyncio.run(run())


def test_a_slow_redis_costs_at_most_the_timeout(server: RedisServer) -> None:
    async def run() -> Fleet:
        fleet = Fleet(server, count=1)
        store = fleet.stores[0]
        await store.admit(RPM)
        server.pause()
        started = time.monotonic()
        await store.admit(RPM)
        await store.charge(SPENDER, 1, 0.0005)
        assert time.monotonic() - started < 2 * TIMEOUT + 0.1
        started = time.monotonic()
        for _ in range(3):
            await store.admit(RPM)  # down: no waiting at all any more (local bucket: 5)
        assert time.monotonic() - started < TIMEOUT
        server.resume()
        assert await until(lambda: store.up, 5 * PROBE_SECONDS + 2)
        await fleet.aclose()
        return fleet

    fleet = asyncio.run(run())
    assert fleet.transitions == [(False, "TimeoutError"), (True, "")]
    assert _spend(server, "spender") == 500


def test_the_spend_read_finds_a_flushed_redis_and_writes_back(server: RedisServer) -> None:
    """No call fails (FLUSHALL keeps connections): the periodic spend read sees the epochs
    gone, and each process writes back what it charged, keys it has not used since too."""

    async def run() -> dict[str, float]:
        fleet = Fleet(server)
        one, two = fleet.stores
        await one.charge(SPENDER, 1, 0.0003)
        await two.charge(SPENDER, 1, 0.0002)
        with server.client() as client:
            client.flushall()
        assert await one.spend([RPM]) == {"rpm": 0.0}  # writes `spender` back all the same
        await two.spend([RPM])
        spent = await one.spend([SPENDER])
        await fleet.aclose()
        assert fleet.transitions == []
        return spent

    assert asyncio.run(run()) == {"spender": 0.0005}
    assert _spend(server, "spender") == 500
