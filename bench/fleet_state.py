"""What fleet state on Redis (issue 15) adds to time-to-first-token and CPU, in one run.

Starts the lean mock upstream, a redis-server of its own on a free loopback port (memory only,
never a system one) and sluicegate twice: `local` keeps its state in the process (no `state:`
block), `redis` has `state.url` pointing at that Redis. Both serve the same client key with an
rpm limit and a budget, set too high to refuse anything, so where the state lives is the only
difference. Rounds of streams at concurrency 1 then go direct, through `local` and through
`redis`, the order rotating each round (bench/scenarios.py), and the script prints added TTFT
p50/p99 over direct, proxy CPU per stream, Redis's cost per request and the ratios of `redis`
to `local`, with issue 15's targets: at most +0.3 ms TTFT p50 and 15% more CPU per stream.
Redis's cost is the time it spent executing commands (INFO commandstats: exact) and the CPU of
its main thread (which adds the network I/O; its idle CPU is subtracted, so it is noisy over a
few requests). It exits 1 if Redis holds no keys afterwards: then nothing was measured.

Placement as in bench/run.py: the mock, Redis and this load generator on core 0, each
sluicegate on core 1 (one at a time is under load).

    python bench/fleet_state.py
    python bench/fleet_state.py --rounds 10 --per-round 25 --json fleet.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import uvloop
from procs import Proc, free_port
from quiet import Machine
from run import LOAD_CORE, Bench, wait_ready
from scenarios import STREAM, Shape, Target, streams

CLIENT_KEY = "sk-bench-fleet-state-0123456789"
TARGETS = {"added_ttft_p50_ms": 0.3, "cpu_ratio": 1.15}
IDLE_SAMPLE = 2.0  # seconds of Redis's idle CPU measured, to subtract from the rounds'
QUIET_BUDGET = 120.0  # seconds the run may wait for other load on the machine to stop
# Limits no request reaches: admission does its full work and always says yes.
KEYED = f"""\
pricing:
  mock-chat: {{input: 0.28, output: 0.42}}
keys:
  bench:
    sha256: "{hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}"
    rpm: 1000000000
    budget: {{usd: 1000000, period: day}}
"""
STATE = """\
state:
  url: ${REDIS_URL}
  on_unavailable: closed            # a store that fails shows as errors, not as a fast path
"""


class KeyedTarget(Target):
    """A proxy that needs the client key: `Authorization` added after the request line."""

    def request(self, mock: dict[str, Any], *, stream: bool = True, seed: int = 0) -> bytes:
        line, rest = super().request(mock, stream=stream, seed=seed).split(b"\r\n", 1)
        return b"%s\r\nauthorization: Bearer %s\r\n%s" % (line, CLIENT_KEY.encode(), rest)


async def redis_call(port: int, command: bytes) -> bytes:
    """One inline command to Redis: its reply, a line (PING, DBSIZE) or a bulk string (INFO)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(command + b"\r\n")
        line = await asyncio.wait_for(reader.readline(), 2.0)
        if line.startswith(b"$"):
            return (await reader.readexactly(int(line[1:]) + 2))[:-2]
        return line.rstrip(b"\r\n")
    finally:
        writer.close()


async def redis_info(port: int) -> dict[str, str]:
    text = (await redis_call(port, b"INFO everything")).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def main_thread_cpu(info: dict[str, str]) -> float:
    """Seconds of CPU on Redis's main thread, the one that runs every command and script."""
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def command_usec(info: dict[str, str]) -> float:
    """µs Redis spent executing commands, less the ones this script sends itself."""
    own = ("cmdstat_info", "cmdstat_ping", "cmdstat_dbsize")
    return sum(
        float(value.split("usec=", 1)[1].split(",", 1)[0])
        for name, value in info.items()
        if name.startswith("cmdstat_") and name not in own
    )


async def redis_cost(port: int, measured: Awaitable[int]) -> dict[str, float]:
    """Redis's main-thread CPU and command time per request while `measured` runs, its idle
    CPU (timers, expiry) over as long subtracted."""
    idle = await redis_info(port)
    await asyncio.sleep(IDLE_SAMPLE)
    before = await redis_info(port)
    idle_rate = (main_thread_cpu(before) - main_thread_cpu(idle)) / IDLE_SAMPLE
    started = time.monotonic()
    requests = await measured
    after = await redis_info(port)
    busy = (
        main_thread_cpu(after) - main_thread_cpu(before) - idle_rate * (time.monotonic() - started)
    )
    n = max(1, requests)
    return {
        "requests": requests,
        "main_thread_cpu_us_per_request": busy / n * 1e6,
        "command_us_per_request": (command_usec(after) - command_usec(before)) / n,
        "keys_stored": float((await redis_call(port, b"DBSIZE")).lstrip(b":") or 0),
    }


async def start_redis(bench: Bench) -> tuple[Proc, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is missing: apt-get install redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(bench.tmp)]
    proc = bench.start("redis", argv, LOAD_CORE)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and proc.alive():
        try:
            if await redis_call(port, b"PING") == b"+PONG":
                proc.settle()
                return proc, port
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer PING:\n{proc.log_tail()}")


async def start_keyed(bench: Bench, name: str, mock_port: int, extra: str) -> KeyedTarget:
    proc, port = bench.start_proxy("auto", mock_port, name, KEYED + extra)
    await wait_ready(port, "/readyz", proc)
    return KeyedTarget(name, port, "bench", proc)


async def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    mock, mock_port = bench.start_mock("lean")
    _, redis_port = await start_redis(bench)
    await wait_ready(mock_port, "/healthz", mock)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"  # for `${REDIS_URL}`
    targets = [
        Target("direct", mock_port, "mock-chat", None),
        await start_keyed(bench, "local", mock_port, ""),
        await start_keyed(bench, "redis", mock_port, STATE),
    ]
    machine = Machine(lambda: [pid for p in bench.procs for pid in p.pids or [p.pid]], QUIET_BUDGET)
    shape = Shape("sequential", 1, count=args.per_round)
    result: dict[str, Any] = {}

    async def rounds() -> int:
        result.update(await streams(targets, mock, shape, args.rounds, machine))
        stats = result["redis"]
        # What reached Redis: the measured streams, those of rounds repeated because other
        # load ran beside them, and the one warm-up request.
        return int(stats["requests"] + stats["rounds_repeated"] * args.per_round + 1)

    try:
        result["redis_server"] = await redis_cost(redis_port, rounds())
    finally:
        for target in targets:
            target.pool.close()
    return result


def compare(result: dict[str, Any]) -> dict[str, Any]:
    """Added TTFT over direct for each proxy, and what `redis` costs over `local`."""
    direct = result["direct"]
    rows = {
        name: {
            "added_ttft_p50_ms": result[name]["ttft_p50_ms"] - direct["ttft_p50_ms"],
            "added_ttft_p99_ms": result[name]["ttft_p99_ms"] - direct["ttft_p99_ms"],
            "proxy_cpu_ms_per_stream": result[name]["proxy_cpu_s_per_1k"],
            "errors": result[name]["errors"],
        }
        for name in ("local", "redis")
    }
    local, redis = rows["local"], rows["redis"]
    state = {
        "added_ttft_p50_ms": redis["added_ttft_p50_ms"] - local["added_ttft_p50_ms"],
        "added_ttft_p99_ms": redis["added_ttft_p99_ms"] - local["added_ttft_p99_ms"],
        "cpu_ratio": redis["proxy_cpu_ms_per_stream"] / local["proxy_cpu_ms_per_stream"],
    }
    state["within_targets"] = all(state[k] <= limit for k, limit in TARGETS.items())
    return {"proxies": rows, "redis_over_local": state, **result["redis_server"]}


def show(summary: dict[str, Any]) -> None:
    print(f"stream: {STREAM}; concurrency 1; {os.cpu_count()} cores")
    print("proxy | added TTFT p50 ms | added TTFT p99 ms | proxy CPU ms/stream | errors")
    for name, row in summary["proxies"].items():
        print(
            f"{name} | {row['added_ttft_p50_ms']:.3f} | {row['added_ttft_p99_ms']:.3f} | "
            f"{row['proxy_cpu_ms_per_stream']:.3f} | {row['errors']}"
        )
    state = summary["redis_over_local"]
    print(
        f"state on Redis adds {state['added_ttft_p50_ms']:+.3f} ms TTFT p50, "
        f"{state['added_ttft_p99_ms']:+.3f} ms p99; CPU per stream x{state['cpu_ratio']:.3f} "
        f"(targets: +{TARGETS['added_ttft_p50_ms']} ms, x{TARGETS['cpu_ratio']}: "
        f"{'met' if state['within_targets'] else 'NOT met'})"
    )
    print(
        f"redis-server: {summary['main_thread_cpu_us_per_request']:.1f} µs of its main thread "
        f"per request ({summary['command_us_per_request']:.1f} µs executing commands), "
        f"{summary['keys_stored']:.0f} keys stored"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per target")
    parser.add_argument("--per-round", type=int, default=25, help="streams per round")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 cores: the load on one, the proxy under test on the other")
    with tempfile.TemporaryDirectory(prefix="sluicegate-fleet-") as tmp:
        bench = Bench(argparse.Namespace(quick=True, proxy_python=""), Path(tmp))
        try:
            os.sched_setaffinity(0, {LOAD_CORE})
            result = uvloop.run(measure(bench, args))
        finally:
            bench.close()
    summary = compare(result)
    show(summary)
    if args.json:
        args.json.write_text(json.dumps({"knobs": STREAM, **summary, "raw": result}, indent=2))
    if not summary["keys_stored"]:
        sys.exit("Redis holds no keys: the `redis` proxy did not use the store")


if __name__ == "__main__":
    main()
