"""What each of sluicegate's per-request features costs, by switching it off (issue 18): the
whole request's CPU, uninstrumented, with all of them on, with one of them off at a time,
and through the floor relay (`bench/floor_relay.py`'s app), round after round in one process
with `asgi_client`'s ASGI client, against `bench/lean_upstream.py`.

    python bench/ablation.py -n 1000 --rounds 5
    python bench/ablation.py --per-chunk          # the relay's loop alone, per chunk

A switch replaces the feature with a no-op for the measurement only (a benchmark's patch,
never a setting): what is left is what the feature cost. They do not add up exactly (a
request with less to do also runs warmer), and the commit hold-back, routing and the relay's
own loop cannot be switched off at all; the difference between "all on" and the floor that
no switch accounts for is theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvloop
from asgi_client import lean_upstream
from request_cost import quiet_stderr
from versus_floor import both_apps, cpu_us


class _NoTimeout:
    """`asyncio.timeout` that never fires (a class, so that it costs less than the real one)."""

    def __init__(self, _delay: float | None = None) -> None:
        pass

    async def __aenter__(self) -> _NoTimeout:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    def reschedule(self, _when: float | None) -> None:
        pass


class _NoWatch:
    """`ClientWatch` that watches nothing."""

    client_gone = False
    done = False

    def __init__(self, *_args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _NoKeepalives:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_exc: object) -> None:
        return None


def _patches(runtime: Any) -> dict[str, list[tuple[Any, str, Any]]]:
    """Each switch: the (object, attribute, no-op) replacements that turn one feature off
    (`runtime` is the running app's: its observers and hooks were bound at start-up)."""
    import proxy.asgi  # noqa: PLC0415
    import proxy.attempts  # noqa: PLC0415
    import proxy.endpoint  # noqa: PLC0415
    import proxy.relay  # noqa: PLC0415
    from proxy.latency import Latency  # noqa: PLC0415
    from proxy.observe import logs  # noqa: PLC0415
    from proxy.observe.metrics import Metrics  # noqa: PLC0415

    fake_asyncio = SimpleNamespace(**{**vars(asyncio), "timeout": _NoTimeout})
    nothing: Callable[..., None] = lambda *_a, **_k: None  # noqa: E731
    return {
        "access log": [(logs, "_access", SimpleNamespace(info=nothing))],
        "metrics (counters, histograms, in-flight gauge)": [
            (Metrics, "_observe", nothing),
            (runtime, "observers", replace(runtime.observers, on_start=())),
            (runtime.latency, "on_ttft", None),
        ],
        "client watch (its task)": [(proxy.endpoint, "ClientWatch", _NoWatch)],
        "timeouts (body, headers, first token, total)": [
            (proxy.asgi, "asyncio", fake_asyncio),
            (proxy.attempts, "asyncio", fake_asyncio),
        ],
        "keep-alive timer": [
            (proxy.relay.Reply, "keepalives", lambda *_a: _NoKeepalives()),
        ],
        "first-token statistics (latency.record)": [(Latency, "record", nothing)],
        "metering (usage, cost)": [
            (proxy.endpoint, "usage_of_body", nothing),
            (proxy.endpoint, "usage_of_stream", nothing),
        ],
    }


@contextmanager
def switched_off(replacements: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in replacements]
    for obj, name, value in replacements:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


async def ablate(config: Path, port: int, n: int, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    async with both_apps(config, port) as (ours, floor):
        switches = _patches(ours.state.runtime)
        for app in (ours, floor):
            for stream in (False, True):
                await cpu_us(app, stream, 100)
        for _ in range(rounds):
            for stream in (False, True):
                kind = "stream" if stream else "non-stream"
                out[f"all on|{kind}"].append(await cpu_us(ours, stream, n))
                for name, replacements in switches.items():
                    with switched_off(replacements):
                        out[f"{name}|{kind}"].append(await cpu_us(ours, stream, n))
                out[f"floor relay|{kind}"].append(await cpu_us(floor, stream, n))
    return out


def table(result: dict[str, list[float]]) -> str:
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    rows = ["| switched off | non-stream µs | saves | stream µs | saves |", "|---|---|---|---|---|"]
    names = list(dict.fromkeys(key.split("|")[0] for key in result))
    base = {k: median(result[f"all on|{k}"]) for k in ("non-stream", "stream")}
    for name in names:
        cells = []
        for kind in ("non-stream", "stream"):
            value = median(result[f"{name}|{kind}"])
            cells += [f"{value:.0f}", "-" if name == "all on" else f"{base[kind] - value:.0f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


CHUNK = (  # one content event, as the lean mock and OpenAI send it
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"word "},"finish_reason":null}]}\n\n'
)


class _Chunks:
    """An upstream response that has `n` chunks ready, for the relay's loop alone."""

    def __init__(self, n: int) -> None:
        self.left = n

    async def _read(self) -> bytes:
        if not self.left:
            return b""
        self.left -= 1
        return CHUNK

    def reader(self) -> tuple[Callable[[], Any], Any]:
        now = asyncio.get_running_loop().time
        return self._read, SimpleNamespace(since=None, now=now, stop=lambda: None)


async def per_chunk(n: int) -> dict[str, float]:
    """µs per chunk of the floor relay's loop, of sluicegate's (`relay._pump`) with a tee
    that does nothing, and with the tee of `auto` (takes out the usage event the client did
    not ask for): no I/O, so only the loops' own Python is left."""
    from proxy.metering.tee import Drop  # noqa: PLC0415
    from proxy.relay import Relayed, _pump  # noqa: PLC0415

    async def send(_message: Any) -> None:
        return None

    async def floor_loop(chunks: _Chunks) -> None:  # floor_relay.py's loop
        read = chunks.reader()[0]
        while chunk := await read():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    nothing = SimpleNamespace(feed=lambda chunk: chunk, end=lambda: b"")
    loops: dict[str, Callable[[_Chunks], Any]] = {
        "floor relay's loop": floor_loop,
        "sluicegate's loop, a tee that does nothing": lambda c: _pump(
            send, c, nothing, Relayed(0.0), b""
        ),
        "sluicegate's loop, `auto`'s tee": lambda c: _pump(send, c, Drop(), Relayed(0.0), b""),
    }
    out: dict[str, list[float]] = defaultdict(list)
    for _ in range(5):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            await loop(_Chunks(n))
            out[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: sorted(values)[2] for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-chunk", action="store_true", help="the relay's loop alone")
    args = parser.parse_args()
    if args.per_chunk:
        for name, us in uvloop.run(per_chunk(200_000)).items():
            print(f"{name}: {us:.2f} µs per chunk")
        return
    with lean_upstream("auto") as (config, port), quiet_stderr():
        result = uvloop.run(ablate(config, port, args.n, args.rounds))
    print(f"python {sys.version.split()[0]}, medians of {args.rounds} rounds of {args.n}")
    print(f"requests each, `auto`, 8-token streams; CPU µs per request\n\n{table(result)}")


if __name__ == "__main__":
    main()
