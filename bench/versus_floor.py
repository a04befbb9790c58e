"""sluicegate against the floor relay (`bench/floor_relay.py`'s app), both in one process
with `request_cost`'s ASGI client, so that neither an HTTP server nor a load generator is in
the figures (issue 18):

- `side_by_side`: the whole request's CPU, uninstrumented, one request at a time,
  alternately (`python bench/request_cost.py --floor`);
- `bursts`: N streams opened at once, the time to each one's first content byte and the CPU
  of the whole burst (`python bench/request_cost.py --burst N`).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from asgi_client import Client, body, call, scope


async def burst(app: Any, n: int) -> dict[str, float]:
    """n streams at once: time to each one's first content byte, and the CPU time used."""
    clients = [Client(body(True, seed, BURST_KNOBS)) for seed in range(n)]
    gc.collect()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    calls = [app(scope("/v1/chat/completions"), c.receive, c.send) for c in clients]
    await asyncio.gather(*calls)
    cpu = time.thread_time() - cpu0
    for c in clients:
        c.gone.set()
    ttft = sorted(c.first_content - t0 for c in clients if c.first_content)
    return {
        "ttft_p50_ms": ttft[len(ttft) // 2] * 1e3 if ttft else math.nan,
        "ttft_p99_ms": ttft[int(len(ttft) * 0.99)] * 1e3 if ttft else math.nan,
        "cpu_ms_per_stream": cpu / n * 1e3,
        "answered": len(ttft),
    }


BURST_KNOBS = {"ttft": 0.05, "tokens": 64, "delay": 0.005}  # bench/scenarios.py's STREAM


async def bursts(config: Path, port: int, n: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {"sluicegate": [], "floor": []}
    async with both_apps(config, port) as (ours, floor):
        for app in (ours, floor):
            await burst(app, 100)  # warm: pools, caches
        for _ in range(rounds):
            out["sluicegate"].append(await burst(ours, n))
            out["floor"].append(await burst(floor, n))
    return out


async def side_by_side(config: Path, port: int, n: int, rounds: int) -> dict[str, list[float]]:
    """CPU µs per request, uninstrumented, one request at a time: sluicegate and the floor
    relay alternately, non-stream and stream (8 tokens)."""
    out: dict[str, list[float]] = defaultdict(list)
    async with both_apps(config, port) as (ours, floor):
        apps = {"sluicegate": ours, "floor": floor}
        for app in apps.values():
            for seed in range(50):
                await call(app, False, seed)
                await call(app, True, seed)
        for _ in range(rounds):
            for name, app in apps.items():
                for stream in (False, True):
                    kind = "stream" if stream else "non-stream"
                    out[f"{name} {kind}"].append(await cpu_us(app, stream, n))
    return out


async def cpu_us(app: Any, stream: bool, n: int) -> float:
    """This thread's CPU µs per request over `n` requests through `app`, one at a time."""
    gc.collect()
    cpu0 = time.thread_time_ns()
    for seed in range(n):
        await call(app, stream, seed)
    return (time.thread_time_ns() - cpu0) / n / 1000


@asynccontextmanager
async def both_apps(config: Path, port: int) -> AsyncIterator[tuple[Any, Any]]:
    """sluicegate's app for `config` and the floor relay's to the mock on `port`, both
    started (lifespan, session) for as long as the block runs; JSON logs."""
    from floor_relay import FloorRelay  # noqa: PLC0415

    from proxy.app import create_app  # noqa: PLC0415
    from proxy.observe.logs import configure  # noqa: PLC0415

    configure(json=True)
    ours: Any = create_app(config, watch_interval=None)
    floor = FloorRelay(f"http://127.0.0.1:{port}")
    async with ours.router.lifespan_context(ours), floor_session(floor):
        yield ours, floor


@asynccontextmanager
async def floor_session(floor: Any) -> AsyncIterator[None]:
    """The floor relay's session, as its lifespan makes it."""
    floor.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    )
    try:
        yield
    finally:
        await floor.session.close()


def print_bursts(result: dict[str, list[dict[str, float]]], n: int) -> None:
    print(f"{n} streams at once, first content byte after the burst began (ms)")
    for name, rounds in result.items():
        cells = [
            f"p50 {r['ttft_p50_ms']:.0f} / p99 {r['ttft_p99_ms']:.0f}, "
            f"{r['cpu_ms_per_stream']:.3f} CPU-ms per stream, {r['answered']:.0f} answered"
            for r in rounds
        ]
        print(f"{name:>10}: " + " | ".join(cells))
