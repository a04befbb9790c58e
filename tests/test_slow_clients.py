"""Clients that read slowly or not at all: back-pressure reaches the upstream read, and an
abandoned stream closes its upstream request at once."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.mock.content import stream_events
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import wait_for

TOKENS = 200_000  # ~37 MB of SSE: far more than every buffer on the way can hide


def _started(server: RunningServer) -> RunningServer:
    # Accepted sockets inherit the listener's buffer sizes. Pinned small, the kernel cannot
    # hide megabytes in send queues (its autotuning allows 4 MB each), so what the upstream
    # gets ahead of the client is the proxy's own buffering plus a bounded kernel remainder.
    server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return server.start()


class Stack:
    def __init__(self, tmp: Path, knobs: Knobs, timeouts: str = "{}") -> None:
        self.mock = MockUpstream(knobs)
        self.upstream = _started(RunningServer(self.mock))
        path = tmp / "routes.yaml"
        path.write_text(
            f"upstreams:\n  mock: {{base_url: '{self.upstream.url}/v1', timeouts: {timeouts}}}\n"
            "routes:\n  - {model: bot, targets: [{upstream: mock, model: m}]}\n"
        )
        self.records: list[RequestRecord] = []
        app = create_app(path, env={}, watch_interval=None, observers=(self.records.append,))
        self.proxy = _started(RunningServer(app))

    def stop(self) -> None:
        self.proxy.stop()
        self.upstream.stop()

    def open_stream(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        sock.connect(("127.0.0.1", self.proxy.port))
        body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        payload = orjson.dumps(body)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        return sock

    def assert_still_serving(self) -> None:
        assert httpx.get(self.proxy.url + "/healthz", timeout=5).json() == {"status": "ok"}
        body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "seed": 3}
        mock = {"tokens": 16, "delay": 0.0, "ttft": 0.0}
        r = httpx.post(self.proxy.url + "/v1/chat/completions", json={**body, "mock": mock})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == expected_content(3, 16)

    def inflight(self) -> float:
        text = httpx.get(self.proxy.url + "/metrics", timeout=5).text
        families = text_string_to_metric_families(text)
        return sum(
            s.value for f in families for s in f.samples if s.name == "sluicegate_inflight_requests"
        )


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    running = Stack(tmp_path, request.param)
    yield running
    running.stop()


@pytest.mark.parametrize("stack", [Knobs(ttft=0.0, delay=0.0, tokens=TOKENS)], indirect=True)
def test_a_slow_reader_throttles_the_upstream_instead_of_filling_the_proxy(stack: Stack) -> None:
    client = stack.open_stream(rcvbuf=4096)
    received, progress = b"", [(0.0, 0)]
    started = time.monotonic()
    try:
        while progress[-1][0] < 4.0:  # a few bytes per 50 ms: ~1.3 KB/s
            received += client.recv(64)
            time.sleep(0.05)
            sent = stack.mock.records[-1].sent_tokens if stack.mock.records else 0
            progress.append((time.monotonic() - started, sent))
    finally:
        client.close()
    # The mock writes every event it can at once (~2 s for all of them, unthrottled): that it
    # stopped far short means nothing on the way read faster than the client.
    at_two_seconds = max(sent for elapsed, sent in progress if elapsed <= 2.0)
    final = progress[-1][1]
    assert 0 < final < TOKENS // 8  # under ~4.6 MB in flight, of ~37 MB
    assert final - at_two_seconds < 1000  # a plateau, not a slow fill
    # What the client did get are the upstream's first bytes, unchanged.
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    events = stream_events(0, "m", TOKENS, "stop", True)
    direct = events.role + b"".join(events.content[:100])
    assert _dechunk(body) == direct[: len(_dechunk(body))]
    assert len(_dechunk(body)) > 1000
    # Leaving closes the upstream request at once, and the proxy is none the worse.
    record = stack.mock.records[-1]
    assert wait_for(lambda: record.disconnected is not None)
    assert wait_for(lambda: len(stack.records) == 1)
    assert stack.records[0].client_disconnected
    stack.assert_still_serving()


def _dechunk(body: bytes) -> bytes:
    """The payload of a (possibly cut) chunked body."""
    out = b""
    while b"\r\n" in body:
        size, rest = body.split(b"\r\n", 1)
        length = int(size, 16)
        out += rest[:length]
        body = rest[length + 2 :]
        if len(rest) < length:
            break
    return out


ABANDONED = 200


@pytest.mark.parametrize("stack", [Knobs(ttft=0.2, delay=0.01, tokens=1000)], indirect=True)
def test_abandoned_streams_close_every_upstream_request_and_the_proxy_serves_on(
    stack: Stack,
) -> None:
    clients = [stack.open_stream() for _ in range(ABANDONED)]
    try:  # every stream reached the upstream (some answering, some before their first token)
        assert wait_for(lambda: len(stack.mock.records) == ABANDONED, 10)
    finally:
        for client in clients:
            client.close()  # without reading a byte
    upstream = stack.mock.records
    assert wait_for(lambda: all(r.disconnected is not None for r in upstream), 5), [
        r for r in upstream if r.disconnected is None
    ][:3]
    assert all(r.finished is None for r in upstream)  # cut short: 1000 tokens take 10 s
    assert wait_for(lambda: len(stack.records) == ABANDONED)
    assert all(r.client_disconnected for r in stack.records)
    assert wait_for(lambda: stack.inflight() == 0)
    stack.assert_still_serving()


def test_a_client_pausing_longer_than_idle_is_not_an_upstream_silence(tmp_path: Path) -> None:
    """`timeouts.idle` bounds the upstream's silences; while the proxy waits for a client that
    stopped reading, the upstream is not being listened to and must not be cut for it."""
    tokens = 20_000  # ~3.7 MB: far more than the buffers hold, so the relay blocks on the client
    stack = Stack(tmp_path, Knobs(ttft=0.0, delay=0.0, tokens=tokens), "{idle: 0.3}")
    try:
        client = stack.open_stream(rcvbuf=4096)
        received = client.recv(4096)
        for _ in range(3):  # three pauses, each over three times the idle limit
            time.sleep(1.0)
            received += client.recv(4096)
        client.settimeout(30)
        while not received.endswith(b"0\r\n\r\n"):
            more = client.recv(1 << 20)
            assert more, "the proxy cut the stream"
            received += more
        client.close()
        events = stream_events(0, "m", tokens, "stop", True)
        expected = events.role + b"".join(events.content) + events.final + events.done
        assert _dechunk(received.split(b"\r\n\r\n", 1)[1]) == expected
        assert wait_for(lambda: len(stack.records) == 1)
        assert stack.records[0].stream_error is None
    finally:
        stack.stop()
