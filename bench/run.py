"""sluicegate's benchmark suite: added TTFT, CPU per stream, memory per open stream and
non-stream capacity, each measured directly against the mock upstream, through sluicegate
(stream_options `pass` and `auto`) and through nginx (`proxy_buffering off`) in one run.

Placement as in the peer harness: mock upstream and load generator on core 0, every proxy
process (sluicegate's, nginx's master and worker) on core 1.

    python bench/run.py                     # full run (~10 min)
    python bench/run.py --quick             # a smaller run (< 3 min)
    python bench/run.py --json out.json     # also write every number as JSON
    python bench/run.py --write-results     # rewrite bench/RESULTS.md (and PROFILE.md)
    python bench/run.py --ttft-only 1 100   # added TTFT alone: direct and `pass`, lean mock
    python bench/run.py --https             # plain against HTTPS upstream (bench/over_https.py)

`--ttft-only N...` runs rounds (`--rounds`) of N concurrent streams (N = 1: one after
another), alternately direct and through sluicegate (`stream_options: pass`), so both see the
same machine state; TTFT is to the first SSE event with non-empty content, not the first byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import profiling
import report
import uvloop
from loadgen import Pool, get_request
from mockcheck import check_mocks
from procs import Proc, free_port, nginx_binary, python, routes_yaml, start, start_nginx
from quiet import Machine
from scenarios import STREAM, Shape, Target, max_rate, open_streams, streams

HERE = Path(__file__).resolve().parent
LOAD_CORE, PROXY_CORE = 0, 1
# Targets measured in the stream rounds only: the floor relay, and the `auto` proxy again.
SAME_PROCESS = ("floor", "sluicegate-auto-usage")


@dataclass(frozen=True)
class Settings:
    """How much of each scenario to run."""

    c1_rounds: int
    c1_per_round: int
    steady_rounds: int
    steady_seconds: float
    steady200_rounds: int
    burst100_rounds: int
    burst1000_rounds: int
    rate_seconds: float
    rate_steps: int
    idle_tokens: int
    profile_seconds: float
    check_rounds: int
    quiet_budget: float  # seconds the whole run may wait for other load to stop

    def shapes(self) -> dict[str, tuple[Shape, int]]:
        return {
            "streams_1": (Shape("sequential", 1, count=self.c1_per_round), self.c1_rounds),
            "streams_100": (Shape("steady", 100, seconds=self.steady_seconds), self.steady_rounds),
            "streams_200": (
                Shape("steady", 200, seconds=self.steady_seconds),
                self.steady200_rounds,
            ),
            "streams_100_burst": (Shape("burst", 100), self.burst100_rounds),
            "streams_1000": (Shape("burst", 1000), self.burst1000_rounds),
        }


QUICK = Settings(
    c1_rounds=2,
    c1_per_round=8,
    steady_rounds=2,
    steady_seconds=2.0,
    steady200_rounds=1,
    burst100_rounds=2,
    burst1000_rounds=2,
    rate_seconds=1.0,
    rate_steps=6,
    idle_tokens=8,
    profile_seconds=0.0,
    check_rounds=2,
    quiet_budget=30.0,
)
FULL = Settings(
    c1_rounds=6,
    c1_per_round=25,
    steady_rounds=6,
    steady_seconds=5.0,
    steady200_rounds=3,
    burst100_rounds=10,
    burst1000_rounds=5,
    rate_seconds=3.0,
    rate_steps=9,
    idle_tokens=20,
    profile_seconds=20.0,
    check_rounds=5,
    quiet_budget=300.0,
)


async def wait_ready(port: int, path: str, proc: Proc, within: float = 30.0) -> None:
    pool = Pool("127.0.0.1", port)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            sample = await pool.fetch(get_request("127.0.0.1", port, path), 1.0)
            if sample.status == 200:
                proc.settle()
                return
            await asyncio.sleep(0.05)
    finally:
        pool.close()
    raise TimeoutError(f"{proc.name} not ready on port {port}:\n{proc.log_tail()}")


class Bench:
    """The processes of one run; everything started here is stopped in `close`."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.settings = QUICK if args.quick else FULL
        self.procs: list[Proc] = []
        self.result: dict[str, Any] = {"scenarios": {}}
        self.machine = Machine(
            lambda: [pid for p in self.procs for pid in p.pids or [p.pid]],
            self.settings.quiet_budget,
        )

    def proxy_python(self, *args: str) -> list[str]:
        """sluicegate and the floor run on `--proxy-python`; the mock and the load generator
        always on this interpreter, so changing the proxy's leaves the harness as it was."""
        return [self.args.proxy_python, *args] if self.args.proxy_python else python(*args)

    def start(self, name: str, argv: list[str], core: int) -> Proc:
        proc = start(name, argv, core, self.tmp)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def start_mock(self, kind: str) -> tuple[Proc, int]:
        port = free_port()
        if kind == "lean":
            argv = python(str(HERE / "lean_upstream.py"), "--port", str(port))
        else:
            argv = python("-m", "proxy", "mock-upstream", "--port", str(port))
        return self.start(f"mock-{kind}", argv, LOAD_CORE), port

    def start_proxy(
        self, mode: str, mock_port: int, name: str = "", extra: str = "", *, ca_file: str = ""
    ) -> tuple[Proc, int]:
        """sluicegate on one route to the mock (over HTTPS with `ca_file`, the CA to trust);
        `extra` is YAML added to its routes file."""
        name = name or f"sluicegate-{mode}"
        config = self.tmp / f"routes-{name}.yaml"
        scheme = "https" if ca_file else "http"
        upstream = f"{scheme}://127.0.0.1:{mock_port}"
        config.write_text(routes_yaml(upstream, mode, ca_file) + extra)
        port = free_port()
        argv = self.proxy_python(
            "-m", "proxy", "serve", "--config", str(config), "--port", str(port)
        )
        return self.start(name, argv, PROXY_CORE), port

    def start_floor(self, mock_port: int) -> tuple[Proc, int]:
        """The thinnest relay on sluicegate's own stack (bench/floor_relay.py)."""
        port = free_port()
        upstream = f"http://127.0.0.1:{mock_port}"
        argv = self.proxy_python(
            str(HERE / "floor_relay.py"), "--upstream", upstream, "--port", str(port)
        )
        return self.start("floor", argv, PROXY_CORE), port

    async def run(self) -> dict[str, Any]:
        mock, mock_port = await self.choose_mock()
        targets = await self.start_targets(mock, mock_port)
        try:
            if self.args.profile_only:
                await self.profile([t for t in targets if t.proc is not None])
            else:
                await self.scenarios(targets, mock)
        finally:
            for target in targets:
                target.pool.close()
        self.result["placement"] = {p.name: p.affinity() for p in self.procs}
        self.result["load_generator_affinity"] = sorted(os.sched_getaffinity(0))
        self.result["waited_for_quiet_s"] = round(self.machine.waited, 1)
        return self.result

    async def choose_mock(self) -> tuple[Proc, int]:
        lean, lean_port = self.start_mock("lean")
        ours, ours_port = self.start_mock("sluicegate")
        await wait_ready(lean_port, "/healthz", lean)
        await wait_ready(ours_port, "/healthz", ours)
        proxy, proxy_port = self.start_proxy("pass", ours_port, "sluicegate-check")
        await wait_ready(proxy_port, "/readyz", proxy)
        check = await check_mocks(
            {"lean": (lean, lean_port), "sluicegate": (ours, ours_port)},
            proxy,
            proxy_port,
            self.settings.check_rounds,
            self.machine,
        )
        self.stop(proxy)
        kind = check["used"] = self.args.mock
        self.result["mock_check"] = check
        self.stop(ours if kind == "lean" else lean)
        return (lean, lean_port) if kind == "lean" else (ours, ours_port)

    async def start_targets(self, mock: Proc, mock_port: int) -> list[Target]:
        targets = [Target("direct", mock_port, "mock-chat", None)]
        for mode in ("pass", "auto"):
            proc, port = self.start_proxy(mode, mock_port)
            await wait_ready(port, "/readyz", proc)
            targets.append(Target(f"sluicegate-{mode}", port, "bench", proc))
        # The same `auto` proxy, for a client that asks for usage: its usage event is relayed
        # (found by a scan) instead of taken out of the stream, as for the SDKs' default
        # request above. Stream rounds only: memory and rate are the process's, measured once.
        usage = {"stream_options": {"include_usage": True}}
        targets.append(Target("sluicegate-auto-usage", port, "bench", proc, usage))
        floor, floor_port = self.start_floor(mock_port)
        await wait_ready(floor_port, "/healthz", floor)
        targets.append(Target("floor", floor_port, "bench", floor))
        binary = None if self.args.no_nginx else nginx_binary()
        if binary is not None:
            port = free_port()
            proc = start_nginx(binary, mock_port, port, PROXY_CORE, self.tmp)
            self.procs.append(proc)
            await wait_ready(port, "/healthz", proc)
            targets.append(Target("nginx", port, "mock-chat", proc))
        return targets

    async def ttft_only(self, concurrency: list[int], rounds: int) -> dict[str, Any]:
        """Added TTFT alone: direct against sluicegate `pass`, on the lean mock."""
        mock, mock_port = self.start_mock("lean")
        await wait_ready(mock_port, "/healthz", mock)
        proxy, port = self.start_proxy("pass", mock_port)
        await wait_ready(port, "/readyz", proxy)
        targets = [Target("direct", mock_port, "mock-chat", None)]
        targets.append(Target("sluicegate-pass", port, "bench", proxy))
        out = self.result["ttft_only"] = {}
        try:
            for n in concurrency:
                one_by_one = Shape("sequential", 1, count=self.settings.c1_per_round)
                shape = one_by_one if n == 1 else Shape("burst", n)
                out[str(n)] = await streams(targets, mock, shape, rounds, self.machine)
                self.progress(f"ttft at {n}", out[str(n)])
        finally:
            for target in targets:
                target.pool.close()
        return self.result

    async def scenarios(self, targets: list[Target], mock: Proc) -> None:
        s, out, machine = self.settings, self.result["scenarios"], self.machine
        # The floor relay is a reference for the stream rounds only: no memory, rate or profile.
        proxies = [t for t in targets if t.proc is not None and t.name not in SAME_PROCESS]
        for target in targets:  # a few requests each, so lazy set-up is in the baseline
            await streams([target], mock, Shape("burst", 10), 1, machine)
        idle = {"ttft": 0.05, "tokens": s.idle_tokens, "delay": 0.5}
        out["memory"] = {t.name: await open_streams(t, 1000, idle, machine) for t in proxies}
        self.progress("memory", out["memory"])
        for key, (shape, rounds) in s.shapes().items():
            out[key] = await streams(targets, mock, shape, rounds, machine)
            self.progress(key, out[key])
        # The floor's non-stream relay is the reference for sluicegate's (issue 18).
        rate_targets = [
            t for t in targets if t.name not in ("sluicegate-auto", "sluicegate-auto-usage")
        ]
        out["nonstream"] = {
            t.name: await max_rate(t, s.rate_seconds, s.rate_steps, machine) for t in rate_targets
        }
        self.progress("nonstream", out["nonstream"])
        await self.profile(proxies + [t for t in targets if t.name == "floor"])

    async def profile(self, proxies: list[Target]) -> None:
        seconds = self.args.profile_seconds or self.settings.profile_seconds or 20.0
        if self.args.no_profile or (self.args.quick and not self.args.profile_seconds):
            return
        ours = [t for t in proxies if t.name.startswith("sluicegate") or t.name == "floor"]
        self.result["profile"] = await profiling.record(ours, seconds, HERE, self.machine)

    def progress(self, name: str, data: dict[str, Any]) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {report.brief(data)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (< 3 min)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--write-results", action="store_true", help="rewrite bench/RESULTS.md")
    parser.add_argument("--mock", choices=["lean", "sluicegate"], default="lean", help="upstream")
    parser.add_argument(
        "--proxy-python", metavar="PATH", default="", help="run the proxy on this interpreter"
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even if installed")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--profile-seconds", type=float, default=0.0)
    parser.add_argument(
        "--profile-only", action="store_true", help="only the py-spy profile: rewrite PROFILE.md"
    )
    parser.add_argument(
        "--ttft-only", type=int, nargs="+", metavar="N", help="only added TTFT at N streams"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per N for --ttft-only")
    parser.add_argument(
        "--https", action="store_true", help="only the stream rounds, plain and HTTPS upstream"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="print (and --write-results) a saved run"
    )
    return parser.parse_args(argv)


def render(args: argparse.Namespace) -> None:
    result = json.loads(args.render.read_text())
    table = report.table(result)
    print(table)
    if args.write_results:
        report.write_results(result, table, HERE / "RESULTS.md")


def in_bench(args: argparse.Namespace, job: Callable[[Bench], Awaitable[Any]]) -> Any:
    """`job` on a Bench whose processes are all stopped after, the load pinned to its core."""
    with tempfile.TemporaryDirectory(prefix="sluicegate-bench-") as tmp, ExitStack() as stack:
        bench = Bench(args, Path(tmp))
        stack.callback(bench.close)
        os.sched_setaffinity(0, {LOAD_CORE})  # children are pinned one by one as they start
        return uvloop.run(job(bench))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        render(args)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 cores: the load on one, the proxy under test on the other")
    started = time.time()
    command = "python bench/run.py " + shlex.join(sys.argv[1:])
    if args.ttft_only:
        result = in_bench(args, lambda bench: bench.ttft_only(args.ttft_only, args.rounds))
        ttft = result["ttft_only"]
        print(report.ttft_table(ttft))
        if args.json:
            args.json.write_text(report.to_json({"knobs": STREAM, "ttft_only": ttft}))
        return
    if args.https:
        import over_https  # noqa: PLC0415  # it imports this module

        over_https.main(args, command, started)
        return
    result = in_bench(args, Bench.run)
    result["meta"] = report.meta(
        command.strip(), started, asdict(QUICK if args.quick else FULL), STREAM, args.proxy_python
    )
    previous = report.previous(args.json or HERE / "results.json")
    if args.json:
        args.json.write_text(report.to_json(result))
    if "profile" in result and (args.write_results or args.profile_only):
        profiling.write_summary(result["profile"], HERE / "PROFILE.md", command)
    if args.profile_only:
        return
    table = report.table(result, previous)
    print(table)
    if args.write_results:
        report.write_results(result, table, HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
