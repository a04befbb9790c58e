"""Time to first token under `weighted`, `least_inflight` and `fastest`, in one run, while one
of two upstreams degrades (issue 17).

Two mock upstreams run in this process (so their TTFT can be turned while the run goes on):
`b` answers its first token after 300 ms throughout; `a` after 50 ms for the first phase,
then slower and slower up to 1 s over the second phase, and stays at 1 s for the third.
Three sluicegate processes, one per strategy, route the same two targets (equal weights,
outliers at their defaults). The same client load reaches all three at once, so they see the
same degradation at the same moment: `--clients` loops per strategy, each sending one stream
after the other. Client-side TTFT (request sent to the first content chunk) p50/p99 per phase,
and each strategy's share of answers from `a`, read from its /metrics.

The mocks share this process with the load generator, so absolute TTFTs carry some
scheduling noise; it is the same for the three strategies.

    python bench/strategies.py                      # 3 phases of 20 s, 2 clients each
    python bench/strategies.py --phase 10 --json strategies.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from procs import free_port

from proxy.mock.upstream import Knobs, MockUpstream
from proxy.serving import RunningServer

STRATEGIES = ("weighted", "least_inflight", "fastest")
PHASES = ("steady", "degrading", "degraded")
FAST, SLOW, WORST = 0.05, 0.3, 1.0
BODY = {"model": "bot", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def knobs(ttft: float) -> Knobs:
    return Knobs(ttft=ttft, tokens=4, delay=0.0)


def a_ttft(elapsed: float, phase: float) -> float:
    """Upstream a's first-token time `elapsed` seconds into the run."""
    if elapsed < phase:
        return FAST
    return FAST + (WORST - FAST) * min(1.0, (elapsed - phase) / phase)


def start_proxy(
    strategy: str, mocks: dict[str, str], tmp: Path
) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp / f"{strategy}.yaml"
    config.write_text(
        "upstreams:\n"
        + "".join(f"  {name}: {{base_url: '{url}/v1'}}\n" for name, url in mocks.items())
        + "routes:\n  - {model: bot, targets: [{upstream: a, model: m}, {upstream: b, model: m}]"
        + f", strategy: {strategy}}}\n"
    )
    port = free_port()
    args = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *args, "--no-watch"])
    return proc, port


async def ready(session: aiohttp.ClientSession, port: int) -> None:
    for _ in range(300):
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"sluicegate on port {port} did not get ready")


async def one_stream(session: aiohttp.ClientSession, port: int) -> float | None:
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    first = None
    async with session.post(url, json=BODY) as response:
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                first = time.monotonic() - started
    return first if response.status == 200 else None


async def client(
    session: aiohttp.ClientSession,
    port: int,
    out: dict[str, list[float]],
    *,
    t0: float,
    phase: float,
) -> None:
    until = t0 + 3 * phase
    while (now := time.monotonic()) < until:
        ttft = await one_stream(session, port)
        if ttft is not None:
            out[PHASES[min(2, int((now - t0) // phase))]].append(ttft)


async def share_of_a(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {"a": 0.0, "b": 0.0}
    for upstream, value in re.findall(
        r'^sluicegate_requests_total{[^}]*upstream="(\w)"[^}]*} (\S+)$', text, re.M
    ):
        counts[upstream] = counts.get(upstream, 0.0) + float(value)
    return counts["a"] / max(1.0, counts["a"] + counts["b"])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
        if ordered
        else float("nan")
    )


async def run(
    phase: float, clients: int, ports: dict[str, int], mock_a: MockUpstream
) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {s: {p: [] for p in PHASES} for s in STRATEGIES}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for port in ports.values():
            await ready(session, port)
        t0 = time.monotonic()
        until = t0 + 3 * phase

        async def degrade() -> None:
            while (now := time.monotonic()) < until:
                mock_a.defaults = knobs(a_ttft(now - t0, phase))
                await asyncio.sleep(0.1)

        loops = [
            client(session, port, results[strategy], t0=t0, phase=phase)
            for strategy, port in ports.items()
            for _ in range(clients)
        ]
        await asyncio.gather(degrade(), *loops)
        shares = {s: await share_of_a(session, port) for s, port in ports.items()}
    return {
        s: {
            "share_a": round(shares[s], 3),
            **{
                p: {
                    "n": len(v),
                    "p50_ms": round(1000 * pct(v, 50), 1),
                    "p99_ms": round(1000 * pct(v, 99), 1),
                }
                for p, v in results[s].items()
            },
        }
        for s in STRATEGIES
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| strategy | " + " | ".join(f"{p} p50 / p99 ms" for p in PHASES) + " | answers from `a` |"
    )
    rows = [head, "|---" * (len(PHASES) + 2) + "|"]
    for s, r in result.items():
        cells = [f"{r[p]['p50_ms']:.0f} / {r[p]['p99_ms']:.0f} (n={r[p]['n']})" for p in PHASES]
        rows.append(f"| `{s}` | " + " | ".join(cells) + f" | {100 * r['share_a']:.0f}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=2, help="sequential clients per strategy")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    mocks = {"a": MockUpstream(defaults=knobs(FAST)), "b": MockUpstream(defaults=knobs(SLOW))}
    servers = {name: RunningServer(app).start() for name, app in mocks.items()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ports = {}
            for strategy in STRATEGIES:
                proc, ports[strategy] = start_proxy(
                    strategy, {n: s.url for n, s in servers.items()}, Path(tmp)
                )
                procs.append(proc)
            result = asyncio.run(run(args.phase, args.clients, ports, mocks["a"]))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for server in servers.values():
            server.stop()
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
