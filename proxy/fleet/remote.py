"""The one module that speaks Redis (redis-py's asyncio client). Every call is one round trip:
a Lua script (proxy.fleet.scripts) or one command. Any failure of a call (Redis's errors, the
socket's, or the client's own after a call was cut short) becomes `StoreDown`, which says
nothing of the URL.

Connections come from a bounded pool (POOL_SIZE; a call past it waits for a free one rather
than opening more; one of them is kept for admissions, the call on the time to first token,
whenever it is free), which `open` fills and readies (scripts loaded) before requests use it,
in the lifespan and after each reconnection: connection setup is not paid within a request's
`state.timeout`."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import PythonRespSerializer
from redis.exceptions import NoScriptError

from proxy.config import StateSettings
from proxy.fleet.ledger import Charged
from proxy.fleet.periods import retain_seconds
from proxy.fleet.scripts import (
    ADMIT,
    CHARGE,
    MISMATCH,
    SYNC,
    UPSTREAM_FAILED,
    UPSTREAM_STATES,
)
from proxy.fleet.store import StoreDown

# Connections per process. A call holds one for one round trip (tens of µs on loopback, under a
# ms in a zone), so this many carry thousands of calls a second; more concurrent calls queue.
# redis-py's own pool would raise at 100 in use, which a burst of streams reaches.
POOL_SIZE = 32
PACKED_KEPT = 4096  # admission commands kept packed (per key, epoch and period)
PACK_CUTOFF = 6000  # redis-py's: arguments longer than this are sent as they are


class RedisState:
    def __init__(self, settings: StateSettings) -> None:
        assert settings.url is not None
        # No retries of its own: the caller's `timeout` bounds each call, and a failure
        # falls back at once (see FleetStore) rather than waiting through a backoff.
        seconds = max(settings.timeout, 1.0)
        pool = BlockingConnectionPool.from_url(
            settings.url.reveal(),
            max_connections=POOL_SIZE,
            timeout=seconds,  # waiting for a free connection
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._redis, self._pool = Redis.from_pool(pool), pool
        encoder = pool.get_encoder()  # type: ignore[no-untyped-call]
        self._packer = PythonRespSerializer(PACK_CUTOFF, encoder.encode)
        self._packed: dict[tuple[str, str, str, tuple[int, int, int]], bytes] = {}
        self._hot: AbstractConnection | None = None  # see `open`
        self._hot_busy = False
        self._prefix = settings.key_prefix
        self.process = secrets.token_hex(8)  # names this process's `seen` keys
        self.answered = 0.0  # time.monotonic() of the last call answered
        self._admit = self._redis.register_script(ADMIT)
        self._charge = self._redis.register_script(CHARGE)
        self._sync = self._redis.register_script(SYNC)
        self._failed = self._redis.register_script(UPSTREAM_FAILED)
        self._states = self._redis.register_script(UPSTREAM_STATES)

    def key(self, name: str, what: str) -> str:
        """`{prefix}{name}:what`: a client key's Redis keys share one hash slot."""
        return f"{self._prefix}{{{name}}}:{what}"

    async def admit(
        self, name: str, epoch: str, period: str, limits: tuple[int, int, int]
    ) -> tuple[int, int, int]:
        """(verdict or MISMATCH, milliseconds to wait, micro-USD spent); limits: rpm, tpm,
        budget in micro-USD, each -1 for none. The one call on the time to first token: its
        command is packed once per key, epoch and period, and sent as it is (`_send`)."""
        call = (name, epoch, period, limits)
        packed = self._packed.get(call)
        if packed is None:
            if len(self._packed) >= PACKED_KEPT:  # keys, epochs and periods come and go
                self._packed.clear()
            keys = [self.key(name, "rpm"), self.key(name, "tpm"), self.spend_key(name, period)]
            args: list[str | int] = ["EVALSHA", self._admit.sha, 4, *keys, self.key(name, "epoch")]
            args += [epoch, *limits]
            packed = self._packed[call] = self._pack(*args)
        verdict, wait, spent = await _guarded(self._send(packed, self._admit))
        self.answered = time.monotonic()
        return int(verdict), int(wait), int(spent)

    def _pack(self, *args: str | int) -> bytes:
        parts: list[bytes] = self._packer.pack(*args)  # type: ignore[no-untyped-call]
        return b"".join(parts)

    async def _send(self, packed: bytes, script: AsyncScript) -> Any:
        """One packed EVALSHA of `script`: redis-py's connections, without the per-call
        packing and bookkeeping of its command layer. On the connection kept for it when that
        one is free (no pool hand-off), else on a pooled one."""
        hot = self._hot
        if hot is None or self._hot_busy:
            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                return await self._round_trip(connection, packed, script)
            finally:
                await self._pool.release(connection)
        self._hot_busy = True
        try:
            return await self._round_trip(hot, packed, script)
        finally:
            self._hot_busy = False

    async def _round_trip(
        self, connection: AbstractConnection, packed: bytes, script: AsyncScript
    ) -> Any:
        """A connection that a failure or a cancellation leaves with a reply unread is closed
        by redis-py (and opened again by the next call). A Redis that lost its scripts gets
        them again."""
        await connection.send_packed_command(packed, check_health=False)
        try:
            return await connection.read_response()
        except NoScriptError:
            await self._redis.script_load(script.script)
            await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response()

    async def charge(self, name: str, epoch: str, period: str, charged: Charged) -> bool:
        """Writes `charged`'s running totals (its tokens, its micro-USD for `period`); only
        what Redis has not applied yet is added. False: epoch mismatch."""
        keys = [self.key(name, "tpm"), self.spend_key(name, period), self.key(name, "epoch")]
        keys += [self._seen(name, "tokens"), self._seen(name, period)]
        micros = (charged.micros.get(period, 0), charged.acked.get(period, 0))
        tokens = (charged.tokens, charged.tokens_acked)
        args: list[str | int] = [epoch, charged.tpm, *tokens, *micros, retain_seconds(period)]
        return int(await self._call(self._charge, keys, args)) != MISMATCH

    async def sync(self, name: str, epochs: tuple[str, str], charged: Charged) -> str:
        """Writes all of `charged`'s running totals; epochs: seen, new → the one in force."""
        keys = [self.key(name, "epoch"), self.key(name, "tpm"), self._seen(name, "tokens")]
        args: list[str | int] = [*epochs, charged.tpm, charged.tokens, charged.tokens_acked]
        for period, total, acked in charged.periods():
            keys += [self.spend_key(name, period), self._seen(name, period)]
            args += [total, acked, retain_seconds(period)]
        return str(await self._call(self._sync, keys, args))

    def _seen(self, name: str, what: str) -> str:
        return self.key(name, f"seen:{self.process}:{what}")

    def spend_key(self, name: str, period: str) -> str:
        return self.key(name, f"spend:{period}")

    async def spent(self, names_periods: Sequence[tuple[str, str]]) -> list[int]:
        """Micro-USD spent, one MGET for every (key name, period)."""
        return (await self.spent_and_epochs(names_periods, ()))[0]

    async def spent_and_epochs(
        self, names_periods: Sequence[tuple[str, str]], names: Sequence[str]
    ) -> tuple[list[int], list[str | None]]:
        """Micro-USD spent per (key name, period), and the epoch of each of `names`: one MGET."""
        keys = [self.spend_key(n, p) for n, p in names_periods]
        keys += [self.key(name, "epoch") for name in names]
        values = await _guarded(self._redis.mget(keys)) if keys else []
        self.answered = time.monotonic()
        spent = [int(v) if v is not None else 0 for v in values[: len(names_periods)]]
        return spent, list(values[len(names_periods) :])

    def upstream_key(self, name: str, what: str) -> str:
        return f"{self._prefix}{{upstreams}}:{name}:{what}"  # one slot: read in one script

    async def upstream_failed(
        self, name: str, failures: int, cooldown_ms: int, probe: bool
    ) -> bool:
        keys = [self.upstream_key(name, "failures"), self.upstream_key(name, "cooldown")]
        return bool(await self._call(self._failed, keys, [failures, cooldown_ms, int(probe)]))

    async def upstream_succeeded(self, name: str) -> None:
        await _guarded(self._redis.delete(self.upstream_key(name, "failures")))

    async def upstream_states(
        self, learnt: Sequence[tuple[str, bool]]
    ) -> list[tuple[int, int, bool]]:
        """(name, rejects stream_options here) → (failures, cooldown ms left, rejects)."""
        keys = [
            self.upstream_key(name, what)
            for name, _ in learnt
            for what in ("failures", "cooldown", "rejects_stream_options")
        ]
        reply = await self._call(self._states, keys, [int(flag) for _, flag in learnt])
        return [(int(f), int(ms), bool(r)) for f, ms, r in reply]

    def response_key(self, response_id: str) -> str:
        return f"{self._prefix}responses:{response_id}"

    async def get_value(self, key: str) -> str | None:
        value = await _guarded(self._redis.get(key))
        self.answered = time.monotonic()
        return str(value) if value is not None else None

    async def set_value(self, key: str, value: str, seconds: int) -> None:
        await _guarded(self._redis.set(key, value, ex=seconds))

    async def delete_value(self, key: str) -> None:
        await _guarded(self._redis.delete(key))

    async def ping(self) -> None:
        await _guarded(self._redis.ping())

    async def open(self) -> None:
        """Opens every pooled connection and loads the scripts (raises StoreDown). The one
        kept for admissions goes back to the pool first, to be checked (after an outage: made
        again) with the others, then is taken out again."""
        if self._hot is not None and not self._hot_busy:
            hot, self._hot = self._hot, None
            await self._pool.release(hot)
        await _guarded(asyncio.gather(*(self._redis.ping() for _ in range(POOL_SIZE))))
        for script in (self._admit, self._charge, self._sync, self._failed, self._states):
            await _guarded(self._redis.script_load(script.script))
        if self._hot is None:  # one of the pool's, kept for admissions (closed with it)
            self._hot = await _guarded(self._pool.get_connection())  # type: ignore[no-untyped-call]

    async def _call(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        reply = await _guarded(script(keys, args))
        self.answered = time.monotonic()
        return reply

    async def aclose(self) -> None:
        await self._redis.aclose()


async def _guarded(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Exception as exc:  # any failure of the client means the store is away
        raise StoreDown(type(exc).__name__) from None
