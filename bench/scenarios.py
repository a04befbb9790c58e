"""The measurements: concurrent stream rounds, open streams for memory, and the search for
the highest non-stream rate whose p99 stays under a bound. Each returns plain dicts."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from loadgen import DONE, OpenLoop, Pool, Sample, chat_request, content_events, round_of
from procs import Cpu, Proc, cpu_of
from quiet import NOISY_SHARE, Machine

STREAM = {"ttft": 0.05, "tokens": 64, "delay": 0.005}
SMALL = {"ttft": 0.0, "tokens": 8, "delay": 0.0}  # a small non-stream answer, at once
P99_BOUND = 0.050
MAX_QUIET_WAIT = 20.0  # seconds a round waits for other load to stop
RATE_CAP = 16000.0  # req/s: beyond it the load generator itself is the limit


@dataclass
class Target:
    """One way to reach the mock: directly, or through a proxy process."""

    name: str
    port: int
    model: str
    proc: Proc | None
    extra: dict[str, Any] | None = None  # request fields besides the usual ones
    tls: ssl.SSLContext | None = None  # reached over HTTPS, trusting this context's CA
    pool: Pool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = Pool("127.0.0.1", self.port, self.tls)

    def request(self, mock: dict[str, Any], *, stream: bool = True, seed: int = 0) -> bytes:
        return chat_request(
            "127.0.0.1",
            self.port,
            self.model,
            stream=stream,
            mock=mock,
            seed=seed,
            extra=self.extra,
        )

    def cpu(self) -> Cpu:
        return self.proc.cpu_used() if self.proc is not None else Cpu()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def stream_error(sample: Sample, tokens: int) -> str | None:
    if sample.error is not None:
        return sample.error
    if sample.status != 200:
        return f"status {sample.status}"
    if sample.first < 0 and tokens:
        return "no content event"
    if not sample.body.endswith(DONE):
        return "no [DONE] at the end"
    if content_events(sample.body) != tokens:
        return f"{content_events(sample.body)} content events, expected {tokens}"
    return None


def own_cpu() -> Cpu:
    return cpu_of([os.getpid()])


@dataclass(frozen=True, slots=True)
class Shape:
    """How a round loads one path: `sequential` streams one after another, `steady`
    concurrency held for `seconds` by closed-loop workers whose starts are spread over
    one stream's length (so requests arrive spread out, as in production), or `burst`
    streams all opened at once."""

    kind: Literal["sequential", "steady", "burst"]
    concurrency: int
    count: int = 0  # sequential: streams per round
    seconds: float = 0.0  # steady: measured seconds per round, after the ramp

    @property
    def name(self) -> str:
        return {"sequential": "1 stream", "steady": f"{self.concurrency} concurrent"}.get(
            self.kind, f"{self.concurrency} opened at once"
        )


RAMP = float(STREAM["ttft"]) + int(STREAM["tokens"]) * float(STREAM["delay"])


@dataclass
class Tally:
    """Samples and resources of one target over all its measured rounds of a scenario."""

    samples: list[Sample] = field(default_factory=list)
    streams: int = 0  # every stream of the rounds, ramp included: what the CPU paid for
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    proxy: Cpu = field(default_factory=Cpu)
    mock: Cpu = field(default_factory=Cpu)
    client: Cpu = field(default_factory=Cpu)
    foreign: float = 0.0
    repeated: int = 0

    def add_errors(self, samples: list[Sample], tokens: int) -> None:
        for sample in samples:
            why = stream_error(sample, tokens)
            if why is not None:
                self.errors[why] = self.errors.get(why, 0) + 1

    def summary(self) -> dict[str, Any]:
        good = [s for s in self.samples if s.first >= 0 and s.error is None]
        ttft, total = [s.ttft for s in good], [s.total for s in good]
        n = max(1, self.streams)
        return {
            "requests": len(self.samples),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "ttft_p50_ms": pct(ttft, 50) * 1e3,
            "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "ttft_max_ms": max(ttft, default=float("nan")) * 1e3,
            "total_p50_ms": pct(total, 50) * 1e3,
            "total_p99_ms": pct(total, 99) * 1e3,
            "streams_per_s": len(self.samples) / self.wall if self.wall else 0.0,
            "proxy_cpu_s_per_1k": self.proxy.total / n * 1e3,
            "proxy_user_s_per_1k": self.proxy.user / n * 1e3,
            "proxy_sys_s_per_1k": self.proxy.system / n * 1e3,
            "mock_cpu_s_per_1k": self.mock.total / n * 1e3,
            "client_cpu_s_per_1k": self.client.total / n * 1e3,
            "foreign_cpu_s": self.foreign,
            "rounds_repeated": self.repeated,
        }


async def steady(
    pool: Pool, request: bytes, shape: Shape, within: float
) -> tuple[list[Sample], int, float]:
    """Closed loop: (streams started in the measured window, all streams, window seconds)."""
    start = time.perf_counter()
    window_start, stop = start + RAMP, start + RAMP + shape.seconds

    async def worker(i: int) -> list[Sample]:
        await asyncio.sleep(i * RAMP / shape.concurrency)
        done = []
        while time.perf_counter() < stop:
            done.append(await pool.fetch(request, within))
        return done

    per_worker = await asyncio.gather(*(worker(i) for i in range(shape.concurrency)))
    everything = [s for samples in per_worker for s in samples]
    measured = [s for s in everything if window_start <= s.started < stop]
    return measured, len(everything), shape.seconds


async def load(
    target: Target, shape: Shape, request: bytes, within: float
) -> tuple[list[Sample], int, float]:
    if shape.kind == "steady":
        return await steady(target.pool, request, shape, within)
    start = time.perf_counter()
    if shape.kind == "sequential":
        samples = [await target.pool.fetch(request, within) for _ in range(shape.count)]
    else:
        samples = await round_of(target.pool, request, shape.concurrency, within)
    return samples, len(samples), time.perf_counter() - start


async def measured_round(
    tally: Tally, target: Target, mock: Proc, shape: Shape, request: bytes, *, machine: Machine
) -> None:
    """One round on one path, repeated (at most twice) if other load ran beside it."""
    within = 10.0 if shape.kind == "sequential" else 30.0 + shape.concurrency * 0.03
    for attempt in range(3):
        await machine.wait_quiet(MAX_QUIET_WAIT)
        mark = machine.mark()
        proxy0, mock0, own0 = target.cpu(), mock.cpu_used(), own_cpu()
        samples, streams, wall = await load(target, shape, request, within)
        foreign, seconds = machine.foreign(mark)
        if foreign <= NOISY_SHARE * seconds or attempt == 2:
            break
        tally.repeated += 1
    tally.samples += samples
    tally.streams += streams
    tally.add_errors(samples, int(STREAM["tokens"]))
    tally.wall += wall
    tally.proxy += target.cpu() - proxy0
    tally.mock += mock.cpu_used() - mock0
    tally.client += own_cpu() - own0
    tally.foreign += foreign


async def streams(
    targets: list[Target], mock: Proc, shape: Shape, rounds: int, machine: Machine
) -> dict[str, dict[str, Any]]:
    """`rounds` interleaved rounds per target, the order rotating each round, after one
    unmeasured warm-up burst per target."""
    tallies = {t.name: Tally() for t in targets}
    for target in targets:
        await round_of(target.pool, target.request(STREAM), min(shape.concurrency, 100), 30.0)
    for r in range(rounds):
        for target in targets[r % len(targets) :] + targets[: r % len(targets)]:
            request = target.request(STREAM, seed=r)
            await measured_round(
                tallies[target.name], target, mock, shape, request, machine=machine
            )
    return {
        name: {"shape": shape.kind, "concurrency": shape.concurrency, **t.summary()}
        for name, t in tallies.items()
    }


async def open_streams(
    target: Target, n: int, knobs: dict[str, Any], machine: Machine
) -> dict[str, Any]:
    """RSS of the target's processes before, and at its peak while n slow streams are open."""
    assert target.proc is not None
    proc, tokens = target.proc, int(knobs["tokens"])
    await machine.wait_quiet(MAX_QUIET_WAIT)
    mark = machine.mark()
    before = proc.rss()
    peak = before

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proc.rss())
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample_rss())
    request = target.request(knobs)
    within = 30.0 + float(knobs["ttft"]) + tokens * float(knobs["delay"])
    try:
        samples = await round_of(target.pool, request, n, within)
    finally:
        sampler.cancel()
    foreign, _ = machine.foreign(mark)
    tally = Tally(samples)
    tally.add_errors(samples, tokens)
    last_first = max((s.first for s in samples if s.first >= 0), default=0.0)
    first_end = min((s.ended for s in samples), default=0.0)
    return {
        "streams": n,
        "knobs": knobs,
        "errors": sum(tally.errors.values()),
        "error_kinds": tally.errors,
        "all_open_at_once": last_first < first_end,
        "rss_before_mb": before / 2**20,
        "rss_open_mb": peak / 2**20,
        "rss_growth_mb": (peak - before) / 2**20,
        "foreign_cpu_s": foreign,
    }


async def rate_step(
    target: Target, request: bytes, rate: float, seconds: float, machine: Machine
) -> dict[str, Any]:
    """One open-loop step; a failed step that ran beside other load is repeated (twice)."""
    for attempt in range(3):
        await machine.wait_quiet(MAX_QUIET_WAIT)
        mark, cpu0 = machine.mark(), target.cpu()
        gen = OpenLoop(target.pool, request)
        await gen.run(rate, seconds)
        cpu = target.cpu() - cpu0
        foreign, wall = machine.foreign(mark)
        latency = [s.total for s in gen.samples if s.error is None and s.status == 200]
        errors = len(gen.samples) - len(latency) + max(0, int(rate * seconds) - len(gen.samples))
        p99 = pct(latency, 99)
        ok = errors == 0 and not gen.overflow and p99 < P99_BOUND
        if ok or foreign <= NOISY_SHARE * wall or attempt == 2:
            break
        await asyncio.sleep(0.3)
    return {
        "rate": rate,
        "requests": len(gen.samples),
        "errors": errors,
        "p50_ms": pct(latency, 50) * 1e3,
        "p99_ms": p99 * 1e3,
        "ok": ok,
        "proxy_cpu_ms_per_req": cpu.total / max(1, len(gen.samples)) * 1e3,
        "foreign_cpu_s": foreign,
        "attempts": attempt + 1,
    }


async def max_rate(
    target: Target, seconds: float, steps: int, machine: Machine, start: float = 500.0
) -> dict[str, Any]:
    """The highest rate (req/s, open loop) with no errors and p99 < P99_BOUND: doubling from
    `start` until a step fails, then bisecting to within 10%, at most `steps` steps."""
    request = target.request(SMALL, stream=False)
    await round_of(target.pool, request, 50, 10.0)  # warm: 50 pooled connections
    best: dict[str, Any] | None = None
    lo, hi, rate, tried = 0.0, None, start, []
    for _ in range(steps):
        step = await rate_step(target, request, rate, seconds, machine)
        tried.append(step)
        if step["ok"]:
            lo, best = rate, step
        else:
            hi = rate
        if hi is None:
            if rate >= RATE_CAP:
                break
            rate = min(RATE_CAP, rate * 2)
        elif hi - lo <= 0.1 * hi:
            break
        else:
            rate = round((lo + hi) / 2, -1)
    return {
        "max_rate": lo,
        "at_max": best,
        "bounded_by_cap": hi is None,
        "steps": tried,
    }
