"""Soak: mixed traffic with faults through a real sluicegate for a set time, watching for leaks.

Starts two mock upstreams (`bench/soak_upstream.py`: a faulty one that also resets every
connection on a second port, and a healthy backup) and the proxy (`python -m proxy serve`),
each its own process on loopback, then keeps `--concurrency` clients busy with the mix in
`soak_traffic.CASES` and checks every answer. Each `--sample-seconds` it reads the proxy's
RSS and open file descriptors from /proc/<pid>, its TCP connections from /proc/<pid>/net/tcp,
and its in-flight gauge from /metrics, and prints a line. Then it stops the traffic, waits for
the proxy to let go of everything, and judges (`soak_verdict.judge`): exit 1 on any lost or
corrupted request, on growth, or on anything left open.

    python bench/soak.py                                  # 30 minutes
    python bench/soak.py --minutes 2 --sample-seconds 20  # what the test suite runs
    python bench/soak.py --json out.json --write-results  # also bench/SOAK.md
    python bench/soak.py --render out.json --write-results  # bench/SOAK.md from a saved run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import report
import soak_report
import uvloop
from procs import Proc, free_port, open_fds, python, rss_of, start, tcp_sockets
from prometheus_client.parser import text_string_to_metric_families
from run import wait_ready
from soak_traffic import CASES, HUNG, Request, routes_yaml, run_one
from soak_verdict import Drained, Limits, Sample, judge

HERE = Path(__file__).resolve().parent
DRAIN_SECONDS = 45.0  # the mocks close idle connections after 5 s; the proxy's pool then follows
LOST_EXAMPLES = 20


class Soak:
    """The processes and the clients of one run; `close` stops every process started here."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self.cases: dict[str, Counter[str]] = defaultdict(Counter)
        self.lost: list[dict[str, Any]] = []
        self.sent = 0
        self.stopping = False
        self.log_offset = 0
        self.log_errors = 0
        self.scrape: aiohttp.ClientSession | None = None  # one connection per /metrics read
        self.seen: dict[str, float] = {}  # the last /metrics read

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    async def start(self) -> Proc:
        ports = self.ports = {n: free_port() for n in ("proxy", "faulty", "backup", "reset")}
        ports["closed"] = free_port()  # bound and released: nothing listens there
        upstream = str(HERE / "soak_upstream.py")
        faulty = python(upstream, "--port", str(ports["faulty"]), "--faults")
        faulty += ["--reset-port", str(ports["reset"])]
        backup = python(upstream, "--port", str(ports["backup"]))
        for name, argv in (("faulty", faulty), ("backup", backup)):
            proc = start(name, argv, None, self.tmp)
            self.procs.append(proc)
            await wait_ready(ports[name], "/healthz", proc)
        config = self.tmp / "routes.yaml"
        config.write_text(
            routes_yaml(ports["faulty"], ports["backup"], ports["reset"], ports["closed"])
        )
        argv = python("-m", "proxy", "serve", "--config", str(config), "--no-watch")
        proxy = start("proxy", [*argv, "--port", str(ports["proxy"])], None, self.tmp)
        self.procs.append(proxy)
        await wait_ready(ports["proxy"], "/readyz", proxy)
        return proxy

    async def run(self) -> dict[str, Any]:
        proxy = await self.start()
        url = f"http://127.0.0.1:{self.ports['proxy']}"
        limits = limits_for(self.args)
        interval = self.args.sample_seconds
        count = max(1, round(self.args.minutes * 60 / interval))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            self.scrape = s
            await asyncio.sleep(1.0)  # the readiness checks' connections close
            baseline = await self.drained(proxy, url)
            print(f"proxy pid {proxy.pid}, {baseline.fds} fds before the traffic", flush=True)
            connector = aiohttp.TCPConnector(limit=self.args.concurrency)
            traffic = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            chat = url + "/v1/chat/completions"
            workers = [
                asyncio.create_task(self.worker(traffic, chat, random.Random(self.args.seed + i)))
                for i in range(self.args.concurrency)
            ]
            started = time.monotonic()
            samples: list[Sample] = []
            for k in range(1, count + 1):
                await asyncio.sleep(max(0.0, started + k * interval - time.monotonic()))
                self.check_alive()
                samples.append(await self.sample(proxy, url, time.monotonic() - started))
                print(soak_report.line(samples), flush=True)
            self.stopping = True
            await asyncio.wait(workers, timeout=HUNG + 5)
            for task in workers:
                task.cancel()
            await traffic.close()
            traffic_seconds = time.monotonic() - started
            drained, waited = await self.drain(proxy, url, baseline.fds)
        verdict = judge(samples, drained, self.counts["lost"], limits)
        return {
            "settings": {
                **vars(self.args),
                "json": str(self.args.json),
                "render": None,
                "limits": asdict(limits),
            },
            "traffic_seconds": round(traffic_seconds, 1),
            "drain_seconds": round(waited, 1),
            "samples": [asdict(s) for s in samples],
            "drained": asdict(drained),
            "counts": dict(self.counts),
            "sent": self.sent,
            "cases": {name: dict(c) for name, c in sorted(self.cases.items())},
            "lost_examples": self.lost,
            "proxy_metrics": {k: v for k, v in sorted(self.seen.items()) if " " in k},
            "proxy_cpu_seconds": round(proxy.cpu_used().total, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "verdict": asdict(verdict),
        }

    async def worker(self, session: aiohttp.ClientSession, url: str, rng: random.Random) -> None:
        weights = [case.weight for case in CASES]
        while not self.stopping:
            request = Request.draw(rng.choices(CASES, weights)[0], rng)
            self.sent += 1
            try:
                kind, why = await run_one(session, url, request)
            except Exception as exc:  # a client that cannot tell what it got has not got it
                kind, why = "lost", f"unexpected {exc!r}"
            self.counts[kind] += 1
            self.cases[request.case.name][kind] += 1
            if why is not None and len(self.lost) < LOST_EXAMPLES:
                case = request.case.name
                self.lost.append({"case": case, "seed": request.seed, "why": why})
                print(f"LOST {case} seed={request.seed} tokens={request.tokens}: {why}")

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")

    def connections(self, proxy: Proc) -> tuple[int, int, int]:
        """The proxy's (established upstream connections, CLOSE_WAIT sockets, clients)."""
        upstreams = {self.ports[n] for n in ("faulty", "backup", "reset")}
        pool = close_wait = clients = 0
        for s in tcp_sockets(proxy.pid):
            close_wait += s.state == "close_wait"
            if s.state == "established":
                pool += s.remote_port in upstreams
                clients += s.local_port == self.ports["proxy"]
        return pool, close_wait, clients

    async def sample(self, proxy: Proc, url: str, at: float) -> Sample:
        rss, fds = rss_of([proxy.pid]), open_fds(proxy.pid)
        pool, close_wait, clients = self.connections(proxy)
        requests, lost, errors = self.counts.total(), self.counts["lost"], self.counts["error"]
        inflight = (await self.metrics(url)).get("inflight", 0.0)  # after the /proc reads
        self.scan_log(proxy)
        return Sample(
            round(at, 1), requests, lost, errors, rss, fds, pool, close_wait, clients, inflight
        )

    async def metrics(self, url: str) -> dict[str, float]:
        """The proxy's /metrics: the in-flight gauge, the request count, and its attempts by
        upstream and outcome, fallbacks and cut streams."""
        assert self.scrape is not None
        async with self.scrape.get(url + "/metrics") as response:
            text = await response.text()
        out: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "sluicegate_inflight_requests":
                    out["inflight"] += s.value
                elif s.name == "sluicegate_requests_total":
                    out["requests"] += s.value
                elif s.name == "sluicegate_upstream_attempts_total":
                    out[f"attempts {s.labels['upstream']} {s.labels['outcome']}"] += s.value
                elif s.name in ("sluicegate_fallbacks_total", "sluicegate_stream_errors_total"):
                    out[f"{s.name[11:-6]} {s.labels['reason']}"] += s.value
        return dict(out)

    def scan_log(self, proxy: Proc) -> None:
        """Count the proxy's error-level log lines and tracebacks written since the last look."""
        with proxy.log.open("rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self.log_offset += end
        for line in data[:end].splitlines():
            if b'"level":"error"' in line or b'"level":"critical"' in line or b"Traceback" in line:
                self.log_errors += 1

    async def drained(self, proxy: Proc, url: str, baseline: int | None = None) -> Drained:
        fds = open_fds(proxy.pid)
        pool, close_wait, _ = self.connections(proxy)
        self.seen = await self.metrics(url)  # after the /proc reads: its connection is not seen
        self.scan_log(proxy)
        return Drained(
            baseline_fds=fds if baseline is None else baseline,
            fds=fds,
            pool=pool,
            close_wait=close_wait,
            inflight=self.seen.get("inflight", 0.0),
            counted=int(self.seen.get("requests", 0)),
            sent=self.sent,
            log_errors=self.log_errors,
        )

    async def drain(self, proxy: Proc, url: str, baseline: int) -> tuple[Drained, float]:
        """Wait until the proxy holds nothing beyond its baseline (at most DRAIN_SECONDS)."""
        began = time.monotonic()
        while True:
            state = await self.drained(proxy, url, baseline)
            settled = not (state.inflight or state.pool or state.close_wait)
            if settled and state.fds <= baseline and state.counted == state.sent:
                break
            if time.monotonic() - began > DRAIN_SECONDS:
                break
            await asyncio.sleep(0.5)
        return state, time.monotonic() - began


def limits_for(args: argparse.Namespace) -> Limits:
    seconds = args.minutes * 60
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60.0, seconds / 4)
    return Limits(warmup=warmup, fd_growth=args.concurrency, pool_growth=args.concurrency)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs")
    parser.add_argument("--concurrency", type=int, default=50, help="clients at once")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="between samples")
    parser.add_argument(
        "--warmup-seconds", type=float, help="not judged for growth (default: 60, or a quarter)"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the request mix")
    parser.add_argument("--json", type=Path, help="write the whole result here")
    parser.add_argument("--write-results", action="store_true", help="rewrite bench/SOAK.md")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="print (and --write-results) a saved run"
    )
    return parser.parse_args(argv)


def report_on(result: dict[str, Any], write: bool) -> int:
    print(soak_report.summary(result))
    if write:
        (HERE / "SOAK.md").write_text(soak_report.markdown(result))
    return 0 if result["verdict"]["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return report_on(json.loads(args.render.read_text()), args.write_results)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    started = time.time()
    command = "python bench/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="sluicegate-soak-") as tmp, ExitStack() as stack:
        soak = Soak(args, Path(tmp))
        stack.callback(soak.close)
        result = uvloop.run(soak.run())
    meta = report.meta(command.strip(), started, {}, {})
    meta.pop("settings")
    result["meta"] = meta
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return report_on(result, args.write_results)


if __name__ == "__main__":
    sys.exit(main())
