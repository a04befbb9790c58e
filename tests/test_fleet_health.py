"""proxy.fleet.health against a real redis-server: two processes' `Health` (in one test)
share consecutive failures, cooldowns and the learnt "rejects stream_options"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from proxy.config import Cooldown, Secret, StateSettings, Upstream
from proxy.fleet.health import FleetHealth
from proxy.fleet.remote import RedisState
from proxy.health import Health, UpstreamHealth
from tests.redis_server import RedisServer

POLICY = Cooldown(failures=3, seconds=30)
FLAKY = Upstream("flaky", "http://127.0.0.1:9/v1", cooldown=POLICY)
PICKY = Upstream("picky", "http://127.0.0.1:9/v1")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer("fleet-health-test-pass") as running:
        yield running


class Process:
    def __init__(self, server: RedisServer) -> None:
        settings = StateSettings(Secret(server.url), "test:", "open", 1.0)
        self.cooldowns: list[tuple[str, bool]] = []
        self.health = Health(on_cooldown=lambda name, on: self.cooldowns.append((name, on)))
        self.remote = RedisState(settings)
        self.shared = FleetHealth(self.remote, self.health, 1.0, lambda: True)
        self.health.shared = self.shared

    async def settle(self) -> None:
        """Lets the background reports land (they are never awaited by a request)."""
        await self.shared.flush()

    async def aclose(self) -> None:
        await self.shared.aclose()
        await self.remote.aclose()


def test_failures_anywhere_add_up_and_the_cooldown_reaches_everyone(
    server: RedisServer,
) -> None:
    async def run() -> tuple[Process, Process]:
        one, two = Process(server), Process(server)
        now = time.monotonic()
        for process in (one, two, one):  # 2 + 1: neither alone reached `failures`
            process.health.failed("flaky", now, POLICY)
            await process.settle()
        assert one.health["flaky"].in_cooldown(now)  # opened by the third report's reply
        assert not two.health["flaky"].in_cooldown(now)
        await two.shared.refresh([FLAKY, PICKY])  # what the 0.25 s loop does
        assert two.health["flaky"].in_cooldown(time.monotonic())
        await one.aclose()
        await two.aclose()
        return one, two

    one, two = asyncio.run(run())
    assert one.cooldowns == [("flaky", True)]
    assert two.cooldowns == [("flaky", True)]


def test_a_success_anywhere_resets_the_shared_count(server: RedisServer) -> None:
    async def run() -> list[tuple[int, int, bool]]:
        one, two = Process(server), Process(server)
        now = time.monotonic()
        one.health.failed("flaky", now, POLICY)
        two.health.failed("flaky", now, POLICY)
        await one.settle()
        await two.settle()
        await one.shared.refresh([FLAKY])  # learns that failures are counted
        one.health.succeeded("flaky")
        await one.settle()
        two.health.failed("flaky", now, POLICY)  # 1 in a row again fleet-wide, not 3
        await two.settle()
        states = await one.remote.upstream_states([("flaky", False)])
        await one.aclose()
        await two.aclose()
        return states

    ((failures, cooldown_ms, _),) = asyncio.run(run())
    assert failures == 1
    assert cooldown_ms < 0  # none


def test_a_learnt_stream_options_rejection_is_shared(server: RedisServer) -> None:
    async def run() -> bool:
        one, two = Process(server), Process(server)
        one.health["picky"].rejects_stream_options = True  # set by attempts on a 400
        await one.shared.refresh([FLAKY, PICKY])
        await two.shared.refresh([FLAKY, PICKY])
        learnt = two.health["picky"].rejects_stream_options
        await one.aclose()
        await two.aclose()
        return learnt

    assert asyncio.run(run()) is True


def test_a_learnt_cooldown_opens_a_closed_circuit_and_never_shortens_one() -> None:
    health = UpstreamHealth("u")
    assert health.open_for(100.0, 20.0, 30.0)  # closed → open until 120
    assert not health.open_for(100.0, 5.0, 30.0)  # already open for longer
    assert health.in_cooldown(119.0)
    assert not health.in_cooldown(121.0)
    health.begin(121.0)  # past it: this attempt is the probe
    assert not health.open_for(121.0, 30.0, 30.0)  # the probe in flight keeps its turn


def test_a_learnt_stream_options_rejection_expires_fleet_wide(server: RedisServer) -> None:
    """Written once when learnt, not again on every refresh: when the mark expires, every
    process tries the field again, and one that meets the refusal again shares it again."""
    flag = "test:{upstreams}:picky:rejects_stream_options"

    async def run() -> tuple[list[bool], bool, int]:
        one, two = Process(server), Process(server)
        one.health["picky"].rejects_stream_options = True
        await one.shared.refresh([PICKY])
        await two.shared.refresh([PICKY])
        with server.client() as client:
            client.pexpire(flag, 300)  # as if the day were over
            for _ in range(8):  # both keep refreshing past the expiry
                await one.shared.refresh([PICKY])
                await two.shared.refresh([PICKY])
                await asyncio.sleep(0.05)
            forgot = [p.health["picky"].rejects_stream_options for p in (one, two)]
            two.health["picky"].rejects_stream_options = True  # refused again, here
            await two.shared.refresh([PICKY])
            await one.shared.refresh([PICKY])
            ttl = int(client.ttl(flag))
        relearnt = one.health["picky"].rejects_stream_options
        await one.aclose()
        await two.aclose()
        return forgot, relearnt, ttl

    forgot, relearnt, ttl = asyncio.run(run())
    assert forgot == [False, False]
    assert relearnt is True
    assert 86_000 < ttl <= 86_400
