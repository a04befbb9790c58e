"""A client connection cannot stall the proxy (proxy/connection.py): the request head is capped
in bytes as they arrive and in time, connections are capped per process, and an HTTP/1.0
client gets a body it can read. Raw sockets misbehave; a well-behaved streaming client on the
same proxy keeps its time to first byte meanwhile, which is the real assertion: the event
loop is not pinned. tests/README.md lists these rows under "Hostile connections"."""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import ServerSettings
from proxy.connection import DEFAULT_LIMITS, ConnectionLimits
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.observe.metrics_server import MetricsApp
from proxy.serving import RunningServer
from tests.helpers import sluicegate, wait_for

# A streaming client's first byte normally comes within milliseconds; a pinned loop (one
# 64 MiB header cost seconds of CPU before the fix) holds it for longer than this.
TTFT_BOUND = 1.0
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}  # the API endpoints take JSON only
OK = b'{"model": "bot", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = b'{"model": "bot", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
ROUTES = """\
server: {{{server}}}
upstreams:
  mock: {{base_url: '{url}/v1'}}
routes:
  - {{model: bot, targets: [{{upstream: mock, model: m}}]}}
"""


@pytest.fixture(scope="module")
def mock() -> Iterator[RunningServer]:
    with RunningServer(MockUpstream(Knobs(ttft=0.0, delay=0.0))) as server:
        yield server


@contextmanager
def running(
    tmp: Path, mock: RunningServer, limits: ConnectionLimits = DEFAULT_LIMITS, server: str = ""
) -> Iterator[RunningServer]:
    path = tmp / "routes.yaml"
    path.write_text(ROUTES.format(server=server, url=mock.url))
    with RunningServer(create_app(path, env={}, watch_interval=None), limits=limits) as proxy:
        yield proxy


def _head(size: int, body: bytes = OK, version: bytes = b"1.1", *, close: bool = True) -> bytes:
    """A POST whose request line and headers take exactly `size` bytes, then its body."""
    start = (
        b"POST %s HTTP/%s\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%sx-pad: "
        % (
            CHAT.encode(),
            version,
            len(body),
            b"connection: close\r\n" if close else b"",
        )
    )
    pad = size - len(start) - 4  # the pad's own CRLF, and the blank line
    assert pad >= 0
    return start + b"p" * pad + b"\r\n\r\n" + body


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    """What came until the connection closed (or was reset), as a head and a body."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # Linux keeps what arrived before the reset readable
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _one_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length, from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line[15:]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1]) if head else 0


def _error_code(body: bytes) -> str:
    return str(orjson.loads(body)["error"]["code"])


def connect(proxy: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def _exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with suppress(OSError):  # answered and closed before all of it was sent
            sock.sendall(request)
        return _response(sock)


def _first_byte_times(url: str, until: Callable[[], bool], at_least: int = 5) -> list[float]:
    """Streams one request after another until `until()` holds (and at least `at_least`
    requests ran): the time each took to its first body byte."""
    times: list[float] = []
    with httpx.Client(timeout=30) as client:
        while len(times) < at_least or not until():
            started = time.perf_counter()
            with client.stream("POST", url + CHAT, content=STREAM, headers=JSON) as r:
                assert r.status_code == 200
                chunks = r.iter_raw()
                next(chunks)
                times.append(time.perf_counter() - started)
                b"".join(chunks)
    return times


# --- the head's size, as it arrives ----------------------------------------------------------


class HeaderFlood:
    """One raw client after another, each sending a request line and then one header value of
    `size` bytes in 1 MiB writes, for `seconds`: what each managed to send and got back."""

    def __init__(self, port: int, size: int, seconds: float) -> None:
        self.port, self.size, self.seconds = port, size, seconds
        self.sent: list[int] = []
        self.answers: list[tuple[bytes, bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            self._one()

    def _one(self) -> None:
        piece = b"a" * (1 << 20)
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sent = 0
            try:
                sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\nx-big: " % CHAT.encode())
                while sent < self.size:
                    sock.sendall(piece)
                    sent += len(piece)
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass  # refused mid-send: what should happen
            self.sent.append(sent)
            try:
                self.answers.append(_response(sock))
            except OSError:
                self.answers.append((b"", b""))


def test_an_oversized_header_is_refused_as_it_arrives_while_others_keep_streaming(
    tmp_path: Path, mock: RunningServer
) -> None:
    size = 64 << 20
    with running(tmp_path, mock) as proxy:
        flood = HeaderFlood(proxy.port, size, seconds=2.0)
        flood.thread.start()
        times = _first_byte_times(proxy.url, lambda: not flood.thread.is_alive())
        flood.thread.join()
    assert max(times) < TTFT_BOUND, f"first bytes took up to {max(times):.2f} s"
    assert flood.sent
    assert all(sent < size for sent in flood.sent), flood.sent  # refused as the bytes came
    # Each attacker got the 431 (Linux keeps it readable after the reset of the rest).
    assert [_status(head) for head, _ in flood.answers] == [431] * len(flood.answers)
    assert {_error_code(body) for _, body in flood.answers} == {"headers_too_large"}


def test_a_head_of_exactly_the_limit_is_served_and_one_byte_more_is_431(
    tmp_path: Path, mock: RunningServer
) -> None:
    limit = 2048
    with running(tmp_path, mock, ConnectionLimits(max_header_bytes=limit)) as proxy:
        head, body = _exchange(proxy.port, _head(limit))
        assert _status(head) == 200
        assert orjson.loads(body)["choices"][0]["message"]["content"] == expected_content(0, 16)
        head, body = _exchange(proxy.port, _head(limit + 1))
        assert _status(head) == 431
        assert _error_code(body) == "headers_too_large"
        assert b"connection: close" in head.lower()


# (limits, head size, bytes per write, seconds between writes, status)
Pieces = tuple[ConnectionLimits, int, int, float, int]


@pytest.mark.parametrize(
    "case",
    [
        # The count runs across reads: 4 KB in 100-byte writes passes a 2048-byte limit.
        (ConnectionLimits(max_header_bytes=2048), 4096, 100, 0.001, 431),
        # Slow is not late: five pieces over ~0.5 s, within a 2 s header_timeout.
        (ConnectionLimits(header_timeout=2.0), 400, 80, 0.1, 200),
    ],
    ids=["counted-across-reads", "slow-within-the-timeout"],
)
def test_a_head_sent_in_pieces(tmp_path: Path, mock: RunningServer, case: Pieces) -> None:
    limits, size, piece, pause, status = case
    request = _head(size)
    with running(tmp_path, mock, limits) as proxy, connect(proxy) as sock:
        with suppress(OSError):  # refused before the end
            for i in range(0, len(request), piece):
                sock.sendall(request[i : i + piece])
                time.sleep(pause)
        assert _status(_response(sock)[0]) == status


def test_a_body_far_larger_than_the_head_limit_arrives_whole(
    tmp_path: Path, mock: RunningServer
) -> None:
    """The read that ends the head usually carries body bytes too: they are not head bytes."""
    content = "x" * 200_000
    body = orjson.dumps({"model": "bot", "messages": [{"role": "user", "content": content}]})
    with running(tmp_path, mock, ConnectionLimits(max_header_bytes=1024)) as proxy:
        head, answer = _exchange(proxy.port, _head(300, body))
    assert _status(head) == 200, answer


def test_the_head_limit_applies_to_each_request_on_a_kept_alive_connection(
    tmp_path: Path, mock: RunningServer
) -> None:
    limits = ConnectionLimits(max_header_bytes=1024)
    with running(tmp_path, mock, limits) as proxy, connect(proxy) as sock:
        for _ in range(3):  # three heads of 1000 bytes: 3000 on the connection, all served
            sock.sendall(_head(1000, close=False))
            assert _status(_one_response(sock)[0]) == 200
        sock.sendall(_head(1025, close=False))
        assert _status(_response(sock)[0]) == 431


# --- the head's time ---------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the proxy closed `sock` within `seconds`, and what it sent before."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return False, data
    return True, data


def test_connections_that_never_finish_their_head_are_closed_after_header_timeout(
    tmp_path: Path, mock: RunningServer
) -> None:
    limits = ConnectionLimits(header_timeout=0.5)
    with running(tmp_path, mock, limits) as proxy, ExitStack() as stack:
        connect = socket.create_connection
        silent = stack.enter_context(connect(("127.0.0.1", proxy.port)))
        partial = stack.enter_context(connect(("127.0.0.1", proxy.port)))
        partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        kept = stack.enter_context(connect(("127.0.0.1", proxy.port)))
        kept.sendall(_head(200, close=False))
        assert _status(_one_response(kept)[0]) == 200
        kept.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # then nothing
        stalled = [partial, kept]
        ends = [_closed_within(sock, 5.0) for sock in [silent, *stalled]]
        assert [closed for closed, _ in ends] == [True, True, True]
        assert ends[0][1] == b""  # nothing came, nothing to answer
        for _, data in ends[1:]:
            head, _, body = data.partition(b"\r\n\r\n")
            assert _status(head) == 408
            assert _error_code(body) == "request_timeout"
        assert httpx.post(proxy.url + CHAT, content=OK, headers=JSON).status_code == 200


# --- the connection cap ----------------------------------------------------------------------


def test_past_max_connections_new_ones_get_503_while_streams_flow_and_healthz_answers(
    tmp_path: Path, mock: RunningServer
) -> None:
    cap = 4
    limits = ConnectionLimits(header_timeout=30, max_connections=cap)
    metrics = RunningServer(MetricsApp(lambda: (b"", "text/plain"), None)).start()
    slow = STREAM[:-1] + b', "mock": {"tokens": 20, "delay": 0.1}}'
    with running(tmp_path, mock, limits) as proxy, ExitStack() as stack:
        stream = stack.enter_context(
            httpx.stream("POST", proxy.url + CHAT, content=slow, headers=JSON)
        )
        chunks = stream.iter_raw()
        first = next(chunks)  # one stream established, and three idle sockets: the cap
        idle = [
            stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port)))
            for _ in range(cap - 1)
        ]
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head: it holds its place
        head, body = _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _status(head) == 503
        assert b"retry-after: 1" in head.lower()
        assert _error_code(body) == "too_many_connections"
        assert httpx.get(metrics.url + "/healthz").json() == {"status": "ok"}
        text = (first + b"".join(chunks)).decode()
        assert "data: [DONE]" in text  # the established stream flowed to its end
        for sock in idle:
            sock.close()
        assert wait_for(lambda: _served(proxy.url))  # room again
    metrics.stop()


def _served(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz").status_code == 200
    except httpx.TransportError:
        return False


# --- bodies on their way hold no in-flight slot ----------------------------------------------


def test_bodies_still_arriving_take_no_inflight_slot(tmp_path: Path, mock: RunningServer) -> None:
    server = "max_inflight: 2, body_timeout: 30"
    with running(tmp_path, mock, server=server) as proxy, ExitStack() as stack:
        trickling = []
        for _ in range(20):  # each sends its head and one byte of a 100-byte body, then waits
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port)))
            sock.sendall(_head(200, b"x" * 100)[: -len(b"x" * 100) + 1])
            trickling.append(sock)
        times = _first_byte_times(proxy.url, lambda: True)  # all 200: none refused with 429
        assert max(times) < TTFT_BOUND
        with ThreadPoolExecutor(3) as pool:  # the limit itself still holds for whole requests
            slow = STREAM[:-1] + b', "mock": {"ttft": 1.0}}'
            post = partial(httpx.post, proxy.url + CHAT, content=slow, headers=JSON, timeout=10)
            statuses = sorted(r.status_code for r in pool.map(lambda _: post(), range(3)))
        assert statuses == [200, 200, 429]


# --- HTTP/1.0 --------------------------------------------------------------------------------


def test_an_http10_client_gets_a_stream_delimited_by_the_close_not_chunked(
    tmp_path: Path, mock: RunningServer
) -> None:
    with running(tmp_path, mock) as proxy:
        head, body = _exchange(proxy.port, _head(200, STREAM, version=b"1.0"))
        plain_head, plain_body = _exchange(proxy.port, _head(200, OK, version=b"1.0"))
    assert _status(head) == 200
    assert b"transfer-encoding" not in head.lower()
    assert body.startswith(b"data: ")
    assert body.endswith(b"data: [DONE]\n\n")
    assert _status(plain_head) == 200
    assert b"content-length: %d" % len(plain_body) in plain_head.lower()
    assert orjson.loads(plain_body)["choices"][0]["message"]["content"] == expected_content(0, 16)


# --- through `sluicegate serve`: the settings come from the routes file ----------------------


def test_serve_takes_the_connection_limits_from_the_routes_file(
    tmp_path: Path, mock: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    server = "max_header_bytes: 2048, header_timeout: 0.5, max_connections: 50"
    path.write_text(ROUTES.format(server=server, url=mock.url))
    with sluicegate("serve", "--config", str(path), "--no-watch") as (_proc, url):
        port = int(url.rsplit(":", 1)[1])
        assert _status(_exchange(port, _head(2049))[0]) == 431
        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert _closed_within(silent, 5.0) == (True, b"")


def test_the_default_connection_cap_is_half_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = ConnectionLimits.of(ServerSettings())
    assert limits.max_connections == (None if soft == resource.RLIM_INFINITY else soft // 2)
    assert ConnectionLimits.of(ServerSettings(max_connections=7)).max_connections == 7
