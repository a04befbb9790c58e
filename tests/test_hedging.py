"""Hedged attempts that commit close together: the loser is closed at the upstream and gives
back its in-flight slot. Two instant mocks and a hedge after 0.1 ms, on real servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from proxy.app import create_app
from proxy.health import Health
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.mock.upstream import RequestRecord as MockRecord
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from proxy.state import Runtime
from tests.helpers import wait_for

MESSAGES = [{"role": "user", "content": "还有优惠吗?"}]


@dataclass
class Hedged:
    proxy: RunningServer
    apps: dict[str, MockUpstream]
    health: Health
    finished: list[RequestRecord]

    def streams(self, seeds: range, threads: int = 20) -> list[bytes]:
        """One streamed request per seed, `threads` at a time; each answer's raw bytes."""
        url = self.proxy.url + "/v1/chat/completions"
        with httpx.Client(timeout=10) as client:

            def one(seed: int) -> bytes:
                body = {"model": "bot", "messages": MESSAGES, "stream": True, "seed": seed}
                with client.stream("POST", url, json=body) as response:
                    return b"".join(response.iter_raw())

            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(one, seeds))


@contextmanager
def hedged(tmp_path: Path, knobs: Knobs) -> Iterator[Hedged]:
    """Upstreams `a` and `b`, both answering with `knobs`, behind a route that hedges `a`
    with `b` after 0.1 ms."""
    apps = {name: MockUpstream(knobs) for name in "ab"}
    servers = [RunningServer(app).start() for app in apps.values()]
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"upstreams:\n  a: {{base_url: '{servers[0].url}/v1'}}\n"
        f"  b: {{base_url: '{servers[1].url}/v1'}}\n"
        "routes:\n  - {model: bot, targets: [{upstream: a, model: m}],\n"
        "     fallbacks: [{upstream: b, model: m}], hedge_after: 0.0001}\n"
    )
    health = Health()
    finished: list[RequestRecord] = []
    app = create_app(
        path,
        env={},
        watch_interval=None,
        runtime=Runtime(health=health),
        observers=(finished.append,),
    )
    try:
        with RunningServer(app) as proxy:
            yield Hedged(proxy, apps, health, finished)
    finally:
        for server in servers:
            server.stop()


def test_hedged_attempts_that_commit_together_leave_no_upstream_counted_in_flight(
    tmp_path: Path,
) -> None:
    """With two instant upstreams and a hedge after 0.1 ms, both attempts often commit in
    the same instant. The one that loses must be closed and give back its in-flight slot:
    `least_inflight` orders upstreams by that count, so a leaked slot would steer traffic
    away from an idle upstream for good."""
    with hedged(tmp_path, Knobs(ttft=0.0, delay=0.0, tokens=4)) as run:
        answers = run.streams(range(200), threads=20)
        assert all(expected_content(s, 4).encode() in _text_bytes(a) for s, a in enumerate(answers))
        health = run.health
        assert wait_for(lambda: (health["a"].inflight, health["b"].inflight) == (0, 0), 5), (
            health["a"].inflight,
            health["b"].inflight,
        )
        # One answer per request, so exactly one attempt counts as `ok`.
        assert wait_for(lambda: len(run.finished) == 200)
        oks = [sum(a.outcome == "ok" for a in r.attempts) for r in run.finished]
        assert set(oks) == {1}


PAUSE = 1.0  # each answer's silence after its first token: the loser's, unless it is closed


def test_the_losing_hedged_attempt_is_closed_at_the_upstream(tmp_path: Path) -> None:
    """Both upstreams answer at once and then pause, so each request's two attempts commit
    together or nearly. The upstream must see the loser's request closed (the proxy dropped
    its connection) before that answer would have run to its end: an unclosed loser would
    hold an upstream slot and keep generating for nobody."""
    seeds = range(100)  # at once: a fifth or so commit in the very same instant
    with hedged(tmp_path, Knobs(ttft=0.0, delay=0.0, tokens=3, pause_after_first=PAUSE)) as run:
        answers = run.streams(seeds, threads=len(seeds))
        assert [_text_bytes(a) for a in answers] == [expected_content(s, 3).encode() for s in seeds]
        assert wait_for(lambda: len(run.finished) == len(seeds))
        by_seed: dict[int, list[MockRecord]] = {s: [] for s in seeds}
        for app in run.apps.values():
            for record in app.records:
                by_seed[record.body["seed"]].append(record)
        losers = []
        for records in by_seed.values():
            winners = [r for r in records if r.finished is not None and r.disconnected is None]
            assert len(winners) == 1, records  # the answer relayed ran to its end
            losers += [r for r in records if r is not winners[0]]
        # With a hedge after 0.1 ms both attempts reach their upstream almost every time.
        assert len(losers) >= len(seeds) // 2
        # The bound: closed while the loser's answer was still paused after its first token.
        assert wait_for(_all(lambda r: r.disconnected is not None, losers), 5)
        assert [r.finished for r in losers] == [None] * len(losers)


def _all(check: Callable[[MockRecord], bool], records: list[MockRecord]) -> Callable[[], bool]:
    return lambda: all(check(r) for r in records)


def _text_bytes(stream: bytes) -> bytes:
    """The content of an SSE answer's deltas, joined."""
    parts = [orjson.loads(line[6:]) for line in stream.split(b"\n") if line.startswith(b"data: {")]
    return "".join(c["delta"].get("content") or "" for p in parts for c in p["choices"]).encode()
