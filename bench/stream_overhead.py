"""Added time-to-first-token of sluicegate over a direct connection, measured in one run.

Starts the mock upstream and the proxy as separate processes (pinned to different cores when
the machine has two or more), then runs rounds of N concurrent streams alternately direct
and through the proxy, so both see the same machine state. TTFT is measured to the first SSE
event whose delta has non-empty content, not to the first byte.

    python bench/stream_overhead.py                    # 1 and 100 concurrent streams
    python bench/stream_overhead.py --concurrency 1000 --rounds 3
    python bench/stream_overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

MIN_STREAMS = 100  # per concurrency level and path, so p99 means something
KNOBS = {"ttft": 0.05, "tokens": 64, "delay": 0.005}
CONTENT = b'"content":"'
EMPTY_CONTENT = b'"content":""'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], cpu: int | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *args], stderr=subprocess.DEVNULL)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {cpu})  # before it starts serving: it is still importing
    return proc


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(url)


async def one_stream(session: aiohttp.ClientSession, url: str, model: str) -> tuple[float, float]:
    """(ttft, total) in seconds for one streamed request."""
    body = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
        "mock": KNOBS,
    }
    start_t = time.perf_counter()
    ttft = -1.0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        tail = b""
        async for chunk in r.content.iter_any():
            if ttft < 0:
                window = tail + chunk
                if CONTENT in window.replace(EMPTY_CONTENT, b""):
                    ttft = time.perf_counter() - start_t
                tail = chunk[-16:]
    return ttft, time.perf_counter() - start_t


async def round_of(
    session: aiohttp.ClientSession, url: str, model: str, n: int
) -> list[tuple[float, float]]:
    return list(await asyncio.gather(*(one_stream(session, url, model) for _ in range(n))))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(
    direct: str, proxied: str, proxy_pid: int, concurrency: int, rounds: int
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await round_of(session, direct, "mock-chat", min(concurrency, 50))  # warm both paths
        await round_of(session, proxied, "bench", min(concurrency, 50))
        d: list[tuple[float, float]] = []
        p: list[tuple[float, float]] = []
        cpu = 0.0
        for _ in range(max(rounds, -(-MIN_STREAMS // concurrency))):
            d += await round_of(session, direct, "mock-chat", concurrency)
            before = cpu_seconds(proxy_pid)
            p += await round_of(session, proxied, "bench", concurrency)
            cpu += cpu_seconds(proxy_pid) - before
    dt, pt = [x[0] for x in d], [x[0] for x in p]
    return {
        "concurrency": concurrency,
        "streams": len(p),
        "direct_ttft_p50_ms": pct(dt, 50) * 1e3,
        "direct_ttft_p99_ms": pct(dt, 99) * 1e3,
        "proxy_ttft_p50_ms": pct(pt, 50) * 1e3,
        "proxy_ttft_p99_ms": pct(pt, 99) * 1e3,
        "added_ttft_p50_ms": (pct(pt, 50) - pct(dt, 50)) * 1e3,
        "added_ttft_p99_ms": (pct(pt, 99) - pct(dt, 99)) * 1e3,
        "direct_total_p50_ms": statistics.median(x[1] for x in d) * 1e3,
        "proxy_total_p50_ms": statistics.median(x[1] for x in p) * 1e3,
        "proxy_cpu_ms_per_stream": cpu / len(p) * 1e3,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, float]]:
    mock_port, proxy_port = free_port(), free_port()
    two_cores = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory() as tmp:
        routes = Path(tmp) / "routes.yaml"
        routes.write_text(
            f"upstreams:\n  mock: {{base_url: 'http://127.0.0.1:{mock_port}/v1'}}\n"
            "routes:\n  - {model: bench, targets: [{upstream: mock, model: mock-chat}]}\n"
        )
        mock = start(["mock-upstream", "--port", str(mock_port)], 0 if two_cores else None)
        proxy = start(
            ["serve", "--config", str(routes), "--port", str(proxy_port)], 1 if two_cores else None
        )
        if two_cores:
            os.sched_setaffinity(0, {0})  # the load generator shares the mock's core
        direct, proxied = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{proxy_port}"
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, direct + "/healthz")
                await wait_ready(session, proxied + "/readyz")
            return [
                await measure(direct, proxied, proxy.pid, c, args.rounds) for c in args.concurrency
            ]
        finally:
            for proc in (proxy, mock):
                proc.terminate()
                proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = uvloop.run(main_async(args))
    print(f"stream: {KNOBS}; python {platform.python_version()}; {os.cpu_count()} cores")
    cols = [
        "concurrency",
        "streams",
        "direct_ttft_p50_ms",
        "proxy_ttft_p50_ms",
        "added_ttft_p50_ms",
        "added_ttft_p99_ms",
        "proxy_cpu_ms_per_stream",
    ]
    print(" | ".join(cols))
    for row in results:
        print(
            " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
        )
    if args.json:
        args.json.write_text(json.dumps({"knobs": KNOBS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
