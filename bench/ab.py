"""A/B of two sluicegate checkouts (`auto`) and the floor relay, in one run, interleaved:
the added TTFT and CPU per stream at a few shapes. For comparing a change against its base
on a shared machine (one run, so both sides see the same noise).

    python bench/ab.py --a /work/main --b /work/base --proxy-python /tmp/venv/bin/python

Each side runs `python -m proxy serve` with its checkout as the working directory (so that
checkout's `proxy` package is the one imported).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import uvloop
from procs import Proc, free_port, pin, python, routes_yaml
from quiet import Machine
from run import HERE, LOAD_CORE, PROXY_CORE, wait_ready
from scenarios import Shape, Target, max_rate, streams

ROUNDS = int(os.environ.get("AB_ROUNDS", "4"))
SHAPES = {
    "100 steady": (Shape("steady", 100, seconds=5.0), ROUNDS),
    "200 steady": (Shape("steady", 200, seconds=5.0), 4),
    "1000 at once": (Shape("burst", 1000), 4),
}


def launch(name: str, argv: list[str], cwd: Path, core: int, logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=out, cwd=cwd, stdin=subprocess.DEVNULL)
    pin([popen.pid], core)
    return Proc(name, popen, core, log)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    procs: list[Proc] = []
    machine = Machine(lambda: [p.pid for p in procs], 300.0)
    mock_port = free_port()
    mock = launch("mock", python(str(HERE / "lean_upstream.py"), "--port", str(mock_port)),
                  HERE.parent, LOAD_CORE, tmp)  # fmt: skip
    procs.append(mock)
    await wait_ready(mock_port, "/healthz", mock)
    targets = []
    try:
        for name, checkout in (("a", args.a), ("b", args.b)):
            config = tmp / f"routes-{name}.yaml"
            config.write_text(routes_yaml(f"http://127.0.0.1:{mock_port}", "auto"))
            port = free_port()
            argv = [args.proxy_python, "-m", "proxy", "serve", "--config", str(config),
                    "--port", str(port)]  # fmt: skip
            proc = launch(name, argv, Path(checkout), PROXY_CORE, tmp)
            procs.append(proc)
            await wait_ready(port, "/readyz", proc)
            targets.append(Target(name, port, "bench", proc))
        port = free_port()
        argv = [args.proxy_python, str(HERE / "floor_relay.py"), "--upstream",
                f"http://127.0.0.1:{mock_port}", "--port", str(port)]  # fmt: skip
        floor = launch("floor", argv, HERE.parent, PROXY_CORE, tmp)
        procs.append(floor)
        await wait_ready(port, "/healthz", floor)
        targets.append(Target("floor", port, "bench", floor))
        direct = Target("direct", mock_port, "mock-chat", None)
        for label, (shape, rounds) in SHAPES.items():
            if args.only and label not in args.only:
                continue
            got = await streams([direct, *targets], mock, shape, rounds, machine)
            base = got["direct"]["ttft_p50_ms"], got["direct"]["ttft_p99_ms"]
            cells = [
                f"{n}: +{r['ttft_p50_ms'] - base[0]:.1f}/+{r['ttft_p99_ms'] - base[1]:.1f} ms "
                f"cpu {r['proxy_cpu_s_per_1k']:.2f}"
                for n, r in got.items()
                if n != "direct"
            ]
            print(f"{label}: " + " | ".join(cells), flush=True)
        if args.rate:
            for target in targets:
                rate = await max_rate(target, 3.0, 9, machine)
                cpu = (rate["at_max"] or {}).get("proxy_cpu_ms_per_req", float("nan"))
                print(f"non-stream {target.name}: {rate['max_rate']:.0f} req/s, "
                      f"{cpu:.3f} CPU-ms/req", flush=True)  # fmt: skip
    finally:
        for target in targets:
            target.pool.close()
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (its proxy/ is imported)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--proxy-python", required=True)
    parser.add_argument("--only", nargs="*", help="shape labels")
    parser.add_argument("--rate", action="store_true", help="also the non-stream rate")
    uvloop.run(main(parser.parse_args()))
