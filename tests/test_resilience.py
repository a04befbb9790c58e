"""Routing and resilience against real misbehaving upstreams: first-token fallback, hedging,
retries and their budget, cooldown, stream_options quirks, JSON answers to streams."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import FRAMINGS, wait_for

MESSAGES = [{"role": "user", "content": "还有优惠吗?"}]


class Upstreams:
    """Mocks with different server-wide defaults, so one request meets different behaviour."""

    def __init__(self) -> None:
        self.apps = {
            "healthy": MockUpstream(),
            "slow": MockUpstream(Knobs(ttft=20.0, keepalives=40)),  # DeepSeek under load
            "failing": MockUpstream(Knobs(status=503)),
            "limited": MockUpstream(Knobs(status=429, retry_after=0.2)),
            "picky": MockUpstream(Knobs(reject_stream_options=True, usage_headers=True)),
            "json": MockUpstream(Knobs(json_for_stream=True)),
        }
        self.servers = {name: RunningServer(app).start() for name, app in self.apps.items()}

    def yaml(self, dead_port: int) -> str:
        lines = ["upstreams:"]
        for name, server in self.servers.items():
            lines.append(f"  {name}:")
            lines.append(f"    base_url: {server.url}/v1")
            lines.append("    cooldown: {failures: 100}")
            if name == "picky":
                lines.append(
                    "    usage_headers: {prompt_tokens: x-prompt-tokens, "
                    "completion_tokens: x-completion-tokens}"
                )
        lines += [
            "  dead:",
            f"    base_url: http://127.0.0.1:{dead_port}/v1",
            "    cooldown: {failures: 1, seconds: 60}",
        ]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    ups = Upstreams()
    yield ups
    for server in ups.servers.values():
        server.stop()


Records = list[RequestRecord]


@pytest.fixture
def serve(
    tmp_path: Path, upstreams: Upstreams, dead_port: int
) -> Iterator[Callable[[str], tuple[RunningServer, Records]]]:
    running: list[RunningServer] = []

    def start(routes: str, server: str = "") -> tuple[RunningServer, Records]:
        path = tmp_path / "routes.yaml"
        path.write_text(server + upstreams.yaml(dead_port) + "routes:\n" + routes)
        records: Records = []
        app = create_app(path, env={}, watch_interval=None, observers=(records.append,))
        server = RunningServer(app).start()
        running.append(server)
        return server, records

    yield start
    for server in running:
        server.stop()


def _raw_stream(url: str, model: str, **extra: Any) -> tuple[float, bytes]:
    body = {"model": model, "messages": MESSAGES, "stream": True, "seed": 9, **extra}
    started = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return time.monotonic() - started, b"".join(r.iter_raw())


@FRAMINGS
def test_first_token_timeout_falls_back_and_no_byte_of_the_stalled_answer_leaks(
    serve: Any, upstreams: Upstreams, newline: str
) -> None:
    """`slow` sends only keep-alive comments, framed as `newline` like the answer: none of
    them is a first token, so the attempt times out and the stream falls back."""
    proxy, records = serve(
        "  - model: bot\n"
        "    targets: [{upstream: slow, model: m}]\n"
        "    fallbacks: [{upstream: healthy, model: m}]\n"
        "    first_token_timeout: 1.0\n"
    )
    extra = {"stream_options": {"include_usage": True}, "mock": {"newline": newline}}
    seconds, via = _raw_stream(proxy.url, "bot", **extra)
    _, direct = _raw_stream(upstreams.servers["healthy"].url, "m", **extra)
    assert via == direct  # exactly the fallback's stream: not one keep-alive from `slow`
    assert seconds >= 1.0  # it waited the first-token timeout, not the slow upstream's 20 s
    slow = upstreams.apps["slow"].records[-1]
    assert wait_for(lambda: slow.disconnected is not None)  # the stalled attempt was closed
    assert wait_for(lambda: len(records) == 1)
    record = records[-1]
    assert [a.outcome for a in record.attempts] == ["first_token_timeout", "ok"]
    assert (record.upstream, record.fallback_reason) == ("healthy", "first_token_timeout")


def test_hedging_starts_the_next_candidate_and_cancels_the_loser(
    serve: Any, upstreams: Upstreams
) -> None:
    proxy, records = serve(
        "  - model: bot\n"
        "    targets: [{upstream: slow, model: m}]\n"
        "    fallbacks: [{upstream: healthy, model: m}]\n"
        "    hedge_after: 0.5\n"
    )
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="bot",
        messages=MESSAGES,
        stream=True,
        seed=4,  # type: ignore[arg-type]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected_content(4, 16)
    slow = upstreams.apps["slow"].records[-1]
    assert wait_for(lambda: slow.disconnected is not None)
    assert wait_for(lambda: len(records) == 1)
    assert sorted(a.outcome for a in records[-1].attempts) == ["hedge_lost", "ok"]


def test_5xx_moves_on_to_the_next_candidate(serve: Any) -> None:
    proxy, records = serve(
        "  - model: bot\n"
        "    targets: [{upstream: failing, model: m}]\n"
        "    fallbacks: [{upstream: healthy, model: m}]\n"
    )
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    answer = client.chat.completions.create(model="bot", messages=MESSAGES, seed=1)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == expected_content(1, 16)
    assert wait_for(lambda: len(records) == 1)
    assert [a.outcome for a in records[-1].attempts] == ["status_5xx", "ok"]
    assert records[-1].fallback_reason == "status_5xx"


def test_retries_are_limited_by_the_budget(serve: Any, upstreams: Upstreams) -> None:
    proxy, records = serve(
        "  - model: bot\n    targets: [{upstream: failing, model: m}]\n    retries: 10\n"
    )
    body = {"model": "bot", "messages": MESSAGES}
    for _ in range(3):
        r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503  # the upstream's own answer, relayed
        assert r.json()["error"]["type"] == "server_error"
    assert wait_for(lambda: len(records) == 3)  # observers run just after the response
    attempts = [len(rec.attempts) for rec in records]
    # A reserve of 3 re-attempts, then 0.2 earned per request: no retry storm.
    assert attempts == [4, 1, 1]


def test_429_is_retried_after_its_retry_after_then_relayed(serve: Any) -> None:
    proxy, records = serve(
        "  - model: bot\n    targets: [{upstream: limited, model: m}]\n    retries: 1\n"
    )
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "bot", "messages": MESSAGES})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "0.2"
    assert wait_for(lambda: len(records) == 1)
    first, second = records[-1].attempts
    assert (first.outcome, second.outcome) == ("status_429", "status_429")


def test_a_dead_upstream_cools_down_and_traffic_moves_to_its_peer(serve: Any) -> None:
    proxy, records = serve(
        "  - model: bot\n"
        "    targets: [{upstream: dead, model: m, weight: 100}, {upstream: healthy, model: m}]\n"
    )
    body = {"model": "bot", "messages": MESSAGES}
    for _ in range(10):
        r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200
    assert wait_for(lambda: len(records) == 10)
    outcomes = [a.outcome for rec in records for a in rec.attempts if a.upstream == "dead"]
    assert outcomes.count("connect_error") == 1  # tried once, then skipped while cooling down
    assert all(rec.upstream == "healthy" for rec in records)


def test_an_upstream_that_rejects_stream_options_is_learnt_once(
    serve: Any, upstreams: Upstreams
) -> None:
    proxy, records = serve("  - model: bot\n    targets: [{upstream: picky, model: m}]\n")
    picky = upstreams.apps["picky"]
    before = len(picky.records)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    for seed in (1, 2):
        stream = client.chat.completions.create(
            model="bot",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            seed=seed,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected_content(seed, 16)
        usage = [c.usage for c in chunks if c.usage is not None]
        assert len(usage) == 1  # the proxy's one added chunk, from the usage headers
        assert usage[0].completion_tokens == 16
    assert wait_for(lambda: len(records) == 2)
    bodies = [r.body for r in picky.records[before:]]
    # First request: rejected with the field, then at once without it; second: one call.
    assert ["stream_options" in b for b in bodies] == [True, False, False]
    assert records[-1].usage is not None
    assert records[-1].usage.source == "header"
    assert records[-1].usage.output == 16


def test_json_answer_to_a_stream_request_becomes_a_stream(serve: Any) -> None:
    proxy, _ = serve("  - model: bot\n    targets: [{upstream: json, model: m}]\n")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="bot",
            messages=MESSAGES,
            stream=True,
            seed=3,  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected_content(3, 16)
    )
    assert all(c.usage is None for c in chunks)  # not asked for, not sent


def test_admission_limit_answers_429_with_retry_after(
    serve: Any, upstreams: Upstreams, tmp_path: Path
) -> None:
    serve("  - model: bot\n    targets: [{upstream: healthy, model: m}]\n")
    path = tmp_path / "routes.yaml"
    text = path.read_text().replace("upstreams:", "server: {max_inflight: 1}\nupstreams:", 1)
    path.write_text(text)
    healthy = upstreams.apps["healthy"]
    seen = len(healthy.records)
    body = {"model": "bot", "messages": MESSAGES, "mock": {"ttft": 2.0}}
    with RunningServer(create_app(path, env={}, watch_interval=None)) as limited:
        url = limited.url + "/v1/chat/completions"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=body, timeout=10)
            assert wait_for(lambda: len(healthy.records) > seen)  # the first is in flight
            r = httpx.post(url, json=body, timeout=10)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "proxy_overloaded"
            assert first.result().status_code == 200
        assert httpx.post(url, json=body, timeout=10).status_code == 200  # the slot is free


class Slammer:
    """A TCP server that reads a request and resets the connection before any response:
    what an overloaded upstream (or its load balancer) does under pressure."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: an RST, not a FIN

    def close(self) -> None:
        self.sock.close()


def test_a_reset_before_headers_is_retried_on_the_next_candidate(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    slammer = Slammer()
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams:\n"
        f"  slam: {{base_url: 'http://127.0.0.1:{slammer.port}/v1'}}\n"
        f"  healthy: {{base_url: '{upstreams.servers['healthy'].url}/v1'}}\n"
        "routes:\n"
        "  - model: bot\n"
        "    targets: [{upstream: slam, model: m}]\n"
        "    fallbacks: [{upstream: healthy, model: m}]\n"
    )
    records: Records = []
    app = create_app(path, env={}, watch_interval=None, observers=(records.append,))
    try:
        with RunningServer(app) as proxy:
            for stream in (False, True):
                body = {"model": "bot", "messages": MESSAGES, "seed": 6, "stream": stream}
                r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
                assert r.status_code == 200
                assert expected_content(6, 16).encode()[:6] in r.content
            assert wait_for(lambda: len(records) == 2)
        assert [[a.outcome for a in rec.attempts] for rec in records] == [["reset", "ok"]] * 2
        assert slammer.accepted >= 2
    finally:
        slammer.close()


def test_a_slow_first_token_gets_the_proxys_keepalives_then_the_answer(
    serve: Any, upstreams: Upstreams
) -> None:
    proxy, _ = serve(
        "  - model: bot\n    targets: [{upstream: healthy, model: m}]\n",
        server="server: {keepalive_seconds: 0.2}\n",
    )
    knobs = {"mock": {"ttft": 1.2}, "stream_options": {"include_usage": True}}
    _, via = _raw_stream(proxy.url, "bot", **knobs)
    _, direct = _raw_stream(upstreams.servers["healthy"].url, "m", **knobs)
    comments = len(via) - len(direct)
    assert comments > 0
    assert via[comments:] == direct  # after the proxy's comments, the upstream's exact bytes
    assert via[:comments] == b": keep-alive\n\n" * (comments // len(b": keep-alive\n\n"))


def test_a_failure_after_keepalives_ends_the_stream_with_an_error_event(serve: Any) -> None:
    proxy, records = serve(
        "  - model: bot\n"
        "    targets: [{upstream: slow, model: m}]\n"
        "    first_token_timeout: 1.0\n"
        "    retries: 0\n",
        server="server: {keepalive_seconds: 0.2}\n",
    )
    _, via = _raw_stream(proxy.url, "bot")
    events = [e for e in via.split(b"\n\n") if e]
    assert set(events[:-1]) == {b": keep-alive"}
    assert events[-1].startswith(b'data: {"error":')
    assert b"upstream_timeout" in events[-1]
    assert wait_for(lambda: len(records) == 1)
    assert records[0].stream_error == "no_answer"
