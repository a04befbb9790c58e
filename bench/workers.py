"""`serve --workers 2` against one worker (issue 18): the non-stream capacity (p99 < 50 ms)
and a steady round of streams, each proxy fresh, the two alternating.

    python bench/workers.py                 # 2 pairs
    python bench/workers.py --pairs 3 --streams 400

Placement: the mock on core 0, as in bench/run.py; the proxy's processes and this load
generator on every core (a second worker needs the second core), so on a 2-core machine
the load generator and the mock share the cores with the workers: a scaling factor
measured here is a floor for what separate machines would show.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import run
from procs import Proc, free_port, routes_yaml, start
from run import Bench, in_bench, wait_ready
from scenarios import Shape, Target, max_rate, streams


async def one(bench: Bench, mock: Proc, mock_port: int, workers: int, n: int) -> dict[str, Any]:
    config = bench.tmp / f"routes-w{workers}.yaml"
    config.write_text(routes_yaml(f"http://127.0.0.1:{mock_port}", "auto"))
    port = free_port()
    serve = ("-m", "proxy", "serve", "--config", str(config), "--port", str(port))
    argv = [*bench.proxy_python(*serve), "--workers", str(workers)]
    proc = start(f"workers-{workers}", argv, None, bench.tmp)
    bench.procs.append(proc)
    try:
        await wait_ready(port, "/readyz", proc)
        target = Target(f"workers-{workers}", port, "bench", proc)
        await streams([target], mock, Shape("burst", 50), 1, bench.machine)
        rate = await max_rate(target, 2.0, 8, bench.machine)
        shape = Shape("steady", n, seconds=4.0)
        row = (await streams([target], mock, shape, 1, bench.machine))[target.name]
        target.pool.close()
    finally:
        bench.stop(proc)
    return {
        "nonstream_req_s": rate["max_rate"],
        "streams_per_s": row["streams_per_s"],
        "ttft_p50_ms": row["ttft_p50_ms"],
        "ttft_p99_ms": row["ttft_p99_ms"],
        "proxy_cpu_s_per_1k": row["proxy_cpu_s_per_1k"],
        "errors": row["errors"],
        "foreign_cpu_s": row["foreign_cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--streams", type=int, default=400, help="steady concurrent streams")
    parser.add_argument("--proxy-python", default="", help="the proxy's interpreter")
    own = parser.parse_args()
    args = run.parse_args(["--quick", "--no-nginx"])
    args.proxy_python = own.proxy_python

    async def job(bench: Bench) -> dict[str, list[dict[str, Any]]]:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        mock, mock_port = bench.start_mock("lean")
        await wait_ready(mock_port, "/healthz", mock)
        out: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        for _ in range(own.pairs):
            for workers in (1, 2):
                out[str(workers)].append(await one(bench, mock, mock_port, workers, own.streams))
                print(workers, out[str(workers)][-1], flush=True)
        return out

    result = in_bench(args, job)
    for key in ("nonstream_req_s", "streams_per_s"):
        one_worker = sum(r[key] for r in result["1"]) / len(result["1"])
        two = sum(r[key] for r in result["2"]) / len(result["2"])
        print(f"{key}: 1 worker {one_worker:,.0f}, 2 workers {two:,.0f}: x{two / one_worker:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
