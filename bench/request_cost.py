"""What one request costs sluicegate in CPU, step by step (issue 18): the per-request path,
not the per-chunk one.

    python bench/request_cost.py                 # 2,000 non-stream and 2,000 short streams
    python bench/request_cost.py -n 500 --profile  # also cProfile's top functions
    python bench/request_cost.py --burst 1000      # N streams at once: sluicegate vs floor

The proxy app runs in this process, called as a raw ASGI app (no HTTP server in front, so
uvicorn's share is left out), one request at a time against `bench/lean_upstream.py` in a
subprocess. Each step is wrapped in a timer of this thread's CPU time
(`time.thread_time_ns`), so waits on the upstream count nothing; requests run one after
another, so nothing else runs inside a step. Steps nest (the upstream write is inside the
attempt walk): each row is inclusive, and "whole request" is the app call from the first
ASGI message to the last. The wrappers cost ~0.3 µs each, counted in their rows.

`--burst N` opens N streams (the bench's 50 ms to the first token, 64 tokens) at once
through the app and through `bench/floor_relay.py`'s app, alternately, both in this process
with the same ASGI client (so neither an HTTP server nor a load generator is in the
figures), and prints the time to the first content byte each app sends, and the CPU time
of the whole burst.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asgi_client
import orjson
import uvloop
import versus_floor
from asgi_client import Client, body, run

SPENT: dict[str, int] = defaultdict(int)
STARTED = [0]  # thread CPU time when the request at hand arrived
PROFILE_CALLEES = os.environ.get("CALLEES", "_admitted|__call__|_arrive")
BEFORE_WRITE = "arrival → upstream write begins (everything before it)"

# (label, module path, attribute, "obj.attr" inside it or "" for a module function)
STEPS: tuple[tuple[str, str, str], ...] = (
    ("app: host check (check_host)", "proxy.app", "check_host"),
    ("flow: request id, record (_RequestFlow.__init__)", "proxy.endpoint", "_RequestFlow.__init__"),
    ("flow: client watch (ClientWatch.__init__)", "proxy.endpoint", "ClientWatch"),
    ("flow: observers.started", "proxy.record", "Observers.started"),
    ("attempts: upstream_call", "proxy.attempts", "upstream_call"),
    ("admission: key (identify)", "proxy.endpoint", "identify"),
    ("admission: origin, content type", "proxy.endpoint", "check_api_request"),
    ("admission: route allowed (check_model)", "proxy.endpoint", "check_model"),
    ("admission: store.admit (rpm/tpm)", "proxy.fleet.local", "LocalStore.admit"),
    ("body read (asgi.read_body)", "proxy.endpoint", "read_body"),
    ("orjson parse + checks (parse_request)", "proxy.endpoint", "parse_request"),
    ("routing: config.route", "proxy.config.model", "Config.route"),
    ("routing: plan", "proxy.attempts", "plan"),
    ("routing: hedge_after", "proxy.attempts", "hedge_after"),
    ("upstream headers (allowlist)", "proxy.endpoint", "upstream_request_headers"),
    ("upstream body (orjson dumps)", "proxy.api_request", "ApiRequest.upstream_body"),
    ("upstream write + wait for headers (clients.send)", "proxy.upstream", "UpstreamClients.send"),
    ("commit: read to the first content event", "proxy.attempts", "Attempts._commit"),
    ("commit: latency.record (streams)", "proxy.latency", "Latency.record"),
    ("read the answer: whole, or to its commit", "proxy.attempts", "Attempts._read"),
    ("attempt walk, all of it (Attempts.run)", "proxy.attempts", "Attempts.run"),
    ("response headers to the client", "proxy.endpoint", "client_response_headers"),
    ("relay of a stream (Reply.relay)", "proxy.relay", "Reply.relay"),
    ("non-stream send (Reply.whole)", "proxy.relay", "Reply.whole"),
    ("metering: tee_for", "proxy.exchange", "tee_for"),
    ("metering: usage_of_stream", "proxy.endpoint", "usage_of_stream"),
    ("metering: usage_of_body", "proxy.endpoint", "usage_of_body"),
    ("metering: cost_usd", "proxy.endpoint", "cost_usd"),
    ("teardown: Answer.aclose", "proxy.answer", "Answer.aclose"),
    ("access-log line", "proxy.app", "access_log"),
    ("metrics: request_started", "proxy.observe.metrics", "Metrics.request_started"),
    ("metrics: request_finished", "proxy.observe.metrics", "Metrics.request_finished"),
    ("metrics: set_ttft (from latency.record)", "proxy.observe.metrics", "Metrics.set_ttft"),
)


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                SPENT[label] += time.thread_time_ns() - t0

        return timed_async

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.thread_time_ns() - t0

    return timed


def instrument() -> None:
    import importlib  # noqa: PLC0415

    for label, module_name, name in STEPS:
        module = importlib.import_module(module_name)
        owner: Any = module
        *outer, attr = name.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, attr, _timed(label, getattr(owner, attr)))
    from proxy.upstream import UpstreamClients  # noqa: PLC0415

    send = UpstreamClients.send

    async def first_send(self: Any, *args: Any) -> Any:
        if STARTED[0]:  # the first attempt's only
            SPENT[BEFORE_WRITE] += time.thread_time_ns() - STARTED[0]
            STARTED[0] = 0
        return await send(self, *args)

    UpstreamClients.send = first_send  # type: ignore[method-assign]


async def one(app: Any, stream: bool, seed: int) -> int:
    """One request, the app's whole CPU time counted under "whole request"."""
    client = Client(body(stream, seed))
    t0 = STARTED[0] = time.thread_time_ns()
    await run(app, client)
    SPENT["whole request" + (" (stream)" if stream else " (non-stream)")] += (
        time.thread_time_ns() - t0
    )
    return client.chunks


@contextmanager
def quiet_stderr() -> Iterator[None]:
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


async def measure(config: Path, n: int, profile: bool) -> dict[str, Any]:
    from proxy.app import create_app  # noqa: PLC0415  # after instrument()
    from proxy.observe.logs import configure  # noqa: PLC0415

    configure(json=True)  # as `serve` logs: JSON lines (to /dev/null here)

    app: Any = create_app(config, watch_interval=None)
    out: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        for stream in (False, True):  # warm-up: pools, caches, first-use imports
            for seed in range(50):
                await one(app, stream, seed)
        gc.collect()
        for stream in (False, True):
            SPENT.clear()
            profiler = cProfile.Profile() if profile else None
            if profiler is not None:
                profiler.enable()
            for seed in range(n):
                await one(app, stream, seed)
            if profiler is not None:
                profiler.disable()
            kind = "stream" if stream else "nonstream"
            out[kind] = {label: ns / n / 1000 for label, ns in SPENT.items()}
            if profiler is not None:
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
                stats.print_stats(25)
                stats.print_callees(PROFILE_CALLEES)
                out[kind + "_profile"] = text.getvalue()
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["| step (inclusive) | non-stream µs | stream µs |", "|---|---|---|"]
    labels = [label for label, *_ in STEPS]
    whole = ["whole request (non-stream)", "whole request (stream)", BEFORE_WRITE]
    for label in [*whole, *labels]:
        a, b = result["nonstream"].get(label), result["stream"].get(label)
        if a is None and b is None:
            continue
        rows.append(f"| {label} | {_us(a)} | {_us(b)} |")
    return "\n".join(rows)


def _us(value: float | None) -> str:
    return "-" if not value else f"{value:.1f}"


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="requests of each kind")
    parser.add_argument("--mode", default="auto", help="the upstream's stream_options")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 too")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--burst", type=int, help="N streams at once, against the floor relay")
    parser.add_argument("--rounds", type=int, default=3, help="bursts (or --floor rounds) of each")
    parser.add_argument(
        "--floor", action="store_true", help="whole-request CPU, uninstrumented, vs the floor"
    )
    parser.add_argument("--tokens", type=int, default=8, help="tokens per short stream")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    args = parser.parse_args()
    asgi_client.TOKENS[0], asgi_client.DELAY[0] = args.tokens, args.delay
    with asgi_client.lean_upstream(args.mode) as (config, port):
        if args.burst:
            with quiet_stderr():
                result = uvloop.run(versus_floor.bursts(config, port, args.burst, args.rounds))
            versus_floor.print_bursts(result, args.burst)
            return
        if args.floor:
            with quiet_stderr():
                sides = uvloop.run(versus_floor.side_by_side(config, port, args.n, args.rounds))
            for name, values in sides.items():
                cells = " ".join(f"{v:.1f}" for v in values)
                print(f"{name:>24}: median {sorted(values)[len(values) // 2]:.1f} µs ({cells})")
            return
        instrument()
        with quiet_stderr():
            result = uvloop.run(measure(config, args.n, args.profile))
    print(f"python {sys.version.split()[0]}, {args.n} requests of each kind, `{args.mode}`\n")
    print(table(result))
    for kind in ("nonstream_profile", "stream_profile"):
        if kind in result:
            print(f"\n{kind}:\n{result[kind]}")
    if args.json:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
