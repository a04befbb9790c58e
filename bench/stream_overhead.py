"""Added time-to-first-token of sluicegate over a direct connection, measured in one run.

Starts the lean mock upstream (bench/lean_upstream.py) and sluicegate (`stream_options:
pass`) as separate processes, the mock and this load generator on core 0 and the proxy on
core 1, then runs rounds of N concurrent streams alternately direct and through the proxy,
so both see the same machine state. TTFT is measured to the first SSE event whose delta
has non-empty content, not to the first byte. N = 1 runs streams one after another; a
larger N opens all N at once. `python bench/run.py` is the whole suite.

    python bench/stream_overhead.py                    # 1 and 100 concurrent streams
    python bench/stream_overhead.py --concurrency 1000 --rounds 3
    python bench/stream_overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import uvloop
from quiet import Machine
from run import LOAD_CORE, Bench, wait_ready
from scenarios import STREAM, Shape, Target, streams

PER_ROUND_AT_1 = 10  # sequential streams per round when N = 1
COLUMNS = (
    "concurrency",
    "streams",
    "direct_ttft_p50_ms",
    "proxy_ttft_p50_ms",
    "added_ttft_p50_ms",
    "added_ttft_p99_ms",
    "proxy_cpu_ms_per_stream",
)


async def measure(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    mock, mock_port = bench.start_mock("lean")
    await wait_ready(mock_port, "/healthz", mock)
    proxy, port = bench.start_proxy("pass", mock_port)
    await wait_ready(port, "/readyz", proxy)
    direct = Target("direct", mock_port, "mock-chat", None)
    through = Target("sluicegate", port, "bench", proxy)
    machine = Machine(lambda: [pid for p in bench.procs for pid in p.pids or [p.pid]], 60.0)
    rows = []
    for n in args.concurrency:
        shape = Shape("sequential", 1, count=PER_ROUND_AT_1) if n == 1 else Shape("burst", n)
        result = await streams([direct, through], mock, shape, args.rounds, machine)
        d, p = result["direct"], result["sluicegate"]
        rows.append(
            {
                "concurrency": n,
                "streams": p["requests"],
                "errors": d["errors"] + p["errors"],
                "direct_ttft_p50_ms": d["ttft_p50_ms"],
                "direct_ttft_p99_ms": d["ttft_p99_ms"],
                "proxy_ttft_p50_ms": p["ttft_p50_ms"],
                "proxy_ttft_p99_ms": p["ttft_p99_ms"],
                "added_ttft_p50_ms": p["ttft_p50_ms"] - d["ttft_p50_ms"],
                "added_ttft_p99_ms": p["ttft_p99_ms"] - d["ttft_p99_ms"],
                "proxy_cpu_ms_per_stream": p["proxy_cpu_s_per_1k"],
            }
        )
    direct.pool.close()
    through.pool.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluicegate-overhead-") as tmp:
        bench = Bench(argparse.Namespace(quick=True), Path(tmp))
        try:
            os.sched_setaffinity(0, {LOAD_CORE})
            rows = uvloop.run(measure(bench, args))
        finally:
            bench.close()
    print(f"stream: {STREAM}; {os.cpu_count()} cores")
    print(" | ".join(COLUMNS))
    for row in rows:
        print(
            " | ".join(
                f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS
            )
        )
    if args.json:
        args.json.write_text(json.dumps({"knobs": STREAM, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
