"""`strategy: fastest` and outlier ejection end to end: two real mock upstreams with TTFT
knobs, the real openai SDK sending one request at a time (or fifty at once), real servers."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from proxy.app import create_app
from proxy.latency import DECAY, HEDGE_MIN_SAMPLES
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import wait_for

BOTH = "targets: [{upstream: a, model: m}, {upstream: b, model: m}]"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _knobs(ttft: float) -> Knobs:
    return Knobs(ttft=ttft, tokens=2, delay=0.0)


def _stream(client: openai.OpenAI) -> openai.Stream[ChatCompletionChunk]:
    return client.chat.completions.create(model="bot", messages=MESSAGES, stream=True)


@dataclass
class Pair:
    proxy: RunningServer
    mocks: dict[str, MockUpstream]
    urls: dict[str, str]
    finished: list[RequestRecord]

    def send(self, n: int, url: str | None = None) -> tuple[Counter[str], list[float]]:
        """`n` streamed requests one at a time: who answered each, and each one's time to
        its first content chunk as the client sees it."""
        client = openai.OpenAI(base_url=(url or self.proxy.url) + "/v1", api_key="x")
        before, ttfts = len(self.finished), []
        for _ in range(n):
            started = time.monotonic()
            first: float | None = None
            for chunk in _stream(client):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - started
            assert first is not None
            ttfts.append(first)
        if url is None:  # each record is written just after its answer ends
            assert wait_for(lambda: len(self.finished) == before + n)
        return Counter(r.upstream or "" for r in self.finished[before:]), ttfts

    def metric(self, name: str, upstream: str) -> float:
        text = httpx.get(self.proxy.url + "/metrics").text
        found = re.search(rf'^{name}{{[^}}]*upstream="{upstream}"[^}}]*}} (\S+)$', text, re.M)
        assert found, name
        return float(found.group(1))


@contextmanager
def pair(tmp_path: Path, ttft: dict[str, float], route: str) -> Iterator[Pair]:
    """Upstreams `a` and `b` with their own default TTFT, behind route `bot` (`route`: its
    keys after the model; `BOTH` as targets, say)."""
    mocks = {name: MockUpstream(defaults=_knobs(t)) for name, t in ttft.items()}
    servers = {name: RunningServer(app).start() for name, app in mocks.items()}
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams:\n"
        + "".join(f"  {n}: {{base_url: '{s.url}/v1'}}\n" for n, s in servers.items())
        + f"routes:\n  - {{model: bot, {route}}}\n"
    )
    finished: list[RequestRecord] = []
    app = create_app(path, env={}, watch_interval=None, observers=(finished.append,))
    try:
        with RunningServer(app) as proxy:
            yield Pair(proxy, mocks, {n: s.url for n, s in servers.items()}, finished)
    finally:
        for server in servers.values():
            server.stop()


def test_one_at_a_time_the_fast_upstream_gets_the_traffic_and_its_first_token_time(
    tmp_path: Path,
) -> None:
    with pair(tmp_path, {"a": 0.05, "b": 0.4}, f"{BOTH}, strategy: fastest") as p:
        p.send(20)  # warm-up
        served, ttfts = p.send(120)
        _, direct = p.send(20, url=p.urls["a"])
    assert served["a"] >= 108, served
    assert statistics.median(ttfts) <= 1.2 * statistics.median(direct)


def test_traffic_leaves_an_upstream_that_slows_and_returns_when_it_recovers(
    tmp_path: Path,
) -> None:
    """Back within DECAY * ln(0.8 / 0.4) = 3.5 s of `a` recovering (its unread cost decays
    below b's, then one fast sample wins): at b's 0.4 s a request, at most 20 requests."""
    with pair(tmp_path, {"a": 0.05, "b": 0.4}, f"{BOTH}, strategy: fastest") as p:
        p.send(20)
        p.mocks["a"].defaults = _knobs(0.8)
        slowed, _ = p.send(30)
        assert slowed["b"] >= 25, slowed
        p.mocks["a"].defaults = _knobs(0.05)
        waited = 0
        while p.send(1)[0]["a"] == 0:
            waited += 1
            assert waited <= int(DECAY * 0.7 / 0.4) + 10
        back, _ = p.send(20)
    assert back["a"] >= 18, back


def test_fifty_at_once_against_equal_upstreams_neither_is_herded(tmp_path: Path) -> None:
    with pair(tmp_path, {"a": 0.05, "b": 0.05}, f"{BOTH}, strategy: fastest") as p:
        p.send(4)
        client = openai.OpenAI(base_url=p.proxy.url + "/v1", api_key="x")

        def one(_: int) -> None:
            for _chunk in _stream(client):
                pass

        before = len(p.finished)
        with ThreadPoolExecutor(50) as pool:
            list(pool.map(one, range(200)))
        assert wait_for(lambda: len(p.finished) == before + 200)
        served = Counter(r.upstream for r in p.finished[before:])
    assert sum(served.values()) == 200
    assert max(served.values()) <= 140, served


def test_an_upstream_ten_times_slower_is_ejected_probed_and_shown_in_metrics(
    tmp_path: Path,
) -> None:
    route = f"{BOTH}, outliers: {{factor: 5, min_samples: 20, seconds: 1}}"
    with pair(tmp_path, {"a": 0.03, "b": 0.3}, route) as p:
        sent = 0
        while p.metric("sluicegate_upstream_ejected", "b") == 0:
            p.send(1)
            sent += 1
            assert sent <= 80  # weighted 50/50: b has its 20 samples well before
        assert p.metric("sluicegate_upstream_ttft_seconds", "b") > 5 * p.metric(
            "sluicegate_upstream_ttft_seconds", "a"
        )
        out, _ = p.send(10)
        assert out == {"a": 10}
        time.sleep(1.1)  # the ejection runs out: b is back and its first request probes it
        probes = 0
        while p.send(1)[0]["b"] == 0:
            probes += 1
            assert probes <= 20
        assert p.metric("sluicegate_upstream_ejected", "b") == 1  # still slow: out again
        again, _ = p.send(10)
    assert again == {"a": 10}


def test_auto_hedging_starts_the_fallback_past_the_usual_first_token_time(
    tmp_path: Path,
) -> None:
    route = "targets: [{upstream: a, model: m}], fallbacks: [{upstream: b, model: m}]"
    with pair(tmp_path, {"a": 0.05, "b": 0.05}, f"{route}, hedge_after: auto") as p:
        p.send(HEDGE_MIN_SAMPLES)  # no hedge before a has its samples
        steady, _ = p.send(20)  # steady: jitter stays under 1.5 x the mean
        p.mocks["a"].defaults = _knobs(2.0)
        hedged, ttfts = p.send(1)
    assert steady == {"a": 20}
    assert all(len(r.attempts) == 1 for r in p.finished[:-1])
    assert hedged == {"b": 1}
    outcomes = {(a.upstream, a.outcome) for a in p.finished[-1].attempts}
    assert outcomes == {("a", "hedge_lost"), ("b", "ok")}
    assert ttfts[0] < 1.0  # b's answer, not a's 2 s
