"""A lean HTTP/1.1 load generator on raw asyncio protocols (no client library in the loop).

Each connection is a protocol that parses the response (content-length or chunked) as it
arrives and timestamps, inside `data_received`, the first SSE event whose delta has
non-empty `content`: TTFT is measured to the first token, not to the first byte. A stream
costs one task; a non-stream request in the open-loop generator costs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

CONTENT = b'"content":"'
DONE = b"data: [DONE]\n\n"
IDLE_REUSE = 4.0  # seconds; below uvicorn's 5 s keep-alive, so a reused socket is never closing
CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class Sample:
    started: float
    first: float = -1.0  # perf_counter at the first content event (streams)
    ended: float = -1.0
    status: int = 0
    body: bytes = b""
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.first - self.started

    @property
    def total(self) -> float:
        return self.ended - self.started


def chat_request(
    host: str,
    port: int,
    model: str,
    *,
    stream: bool,
    mock: dict[str, Any],
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> bytes:
    body = orjson.dumps(
        {
            "model": model,
            "stream": stream,
            "seed": seed,
            "messages": [{"role": "user", "content": "hello"}],
            "mock": mock,
            **(extra or {}),
        }
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
        f"content-type: application/json\r\naccept: */*\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode()


def has_content(window: bytes) -> bool:
    """A `"content":"` marker followed by a non-empty string (role chunks carry `""`)."""
    i = window.find(CONTENT)
    while i >= 0:
        j = i + len(CONTENT)
        if j < len(window) and window[j] != 0x22:
            return True
        i = window.find(CONTENT, j)
    return False


def content_events(body: bytes) -> int:
    return body.count(b'{"content":') - body.count(b'{"content":""')


class Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.perf_counter()
        self.reusable = True
        self._sample: Sample | None = None
        self._done: Callable[[Conn, Sample], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._state = "head"  # head → size ⇄ data → end, or head → fixed → end
        self._need = 0
        self._body: list[bytes] = []
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport, self.reusable = None, False
        if self._sample is not None:
            self._finish(f"connection lost: {exc or 'closed by peer'}")

    def send(self, request: bytes, sample: Sample, done: Callable[[Conn, Sample], None]) -> None:
        assert self.transport is not None
        assert self._sample is None
        self._sample, self._done = sample, done
        self.transport.write(request)

    def abort(self, why: str) -> None:
        self.reusable = False
        if self._sample is not None:
            self._finish(why)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._sample is None:
            self.abort("bytes outside a response")
            return
        self._buf += data
        while self._sample is not None and self._step(now):
            pass

    def _step(self, now: float) -> bool:
        """Consume what the buffer allows of the current state; False when it needs more."""
        if self._state == "head":
            return self._head()
        if self._state == "size":
            return self._size()
        if self._state == "end":  # after the last chunk: the empty trailer line
            if len(self._buf) >= 2:
                del self._buf[:2]
                self._finish(None)
            return False
        framing = 2 if self._state == "data" else 0  # a chunk's data ends with CRLF
        if len(self._buf) < self._need + framing:
            return False
        piece = bytes(self._buf[: self._need])
        del self._buf[: self._need + framing]
        self._piece(piece, now)
        if self._state == "fixed":
            self._finish(None)
            return False
        self._state = "size"
        return True

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        self._parse_head(bytes(self._buf[:end]))
        del self._buf[: end + 4]
        return True

    def _size(self) -> bool:
        end = self._buf.find(b"\r\n")
        if end < 0:
            return False
        self._need = int(bytes(self._buf[:end]).split(b";")[0], 16)
        del self._buf[: end + 2]
        self._state = "data" if self._need else "end"
        return True

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        assert self._sample is not None
        self._sample.status = int(lines[0].split(b" ", 2)[1])
        self._state, self._need = "fixed", 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                self._need = int(value)
            elif name == b"transfer-encoding" and value == b"chunked":
                self._state = "size"
            elif name == b"connection" and value == b"close":
                self.reusable = False

    def _piece(self, piece: bytes, now: float) -> None:
        self._body.append(piece)
        sample = self._sample
        if sample is not None and sample.first < 0:
            window = self._tail + piece
            if has_content(window):
                sample.first = now
            self._tail = window[-len(CONTENT) :]

    def _finish(self, error: str | None) -> None:
        sample, done = self._sample, self._done
        assert sample is not None
        assert done is not None
        sample.ended, sample.error = time.perf_counter(), error
        sample.body = b"".join(self._body)
        self._sample, self._done = None, None
        self._reset()
        self.idle_since = sample.ended
        done(self, sample)


@dataclass
class Pool:
    """Keep-alive connections to one address (over TLS with `tls`, a client context); a
    connection idle for IDLE_REUSE is dropped."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    idle: list[Conn] = field(default_factory=list)
    opened: int = 0

    def take(self) -> Conn | None:
        now = time.perf_counter()
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and conn.reusable and now - conn.idle_since < IDLE_REUSE:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(Conn, self.host, self.port, ssl=self.tls)
        self.opened += 1
        return conn

    def give_back(self, conn: Conn) -> None:
        if conn.transport is not None and conn.reusable:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()

    async def fetch(self, request: bytes, within: float) -> Sample:
        """One request, its timing measured from before the connection is taken."""
        sample = Sample(time.perf_counter())
        future: asyncio.Future[Sample] = asyncio.get_running_loop().create_future()
        conn: Conn | None = None
        try:
            async with asyncio.timeout(within):
                conn = self.take() or await self.connect()

                def done(_conn: Conn, result: Sample) -> None:
                    if not future.done():
                        future.set_result(result)

                conn.send(request, sample, done)
                await future
        except (TimeoutError, OSError) as exc:
            if conn is not None:
                conn.abort("timeout")
            sample.ended, sample.error = time.perf_counter(), f"{type(exc).__name__}: {exc}"
            return sample
        self.give_back(conn)
        return sample


async def round_of(pool: Pool, request: bytes, n: int, within: float) -> list[Sample]:
    """n requests started at once (up to n connections)."""
    return list(await asyncio.gather(*(pool.fetch(request, within) for _ in range(n))))


async def warm(pool: Pool, n: int) -> None:
    """Open n connections and park them, so the next round reuses them."""
    conns = await asyncio.gather(*(pool.connect() for _ in range(n)))
    for conn in conns:
        pool.give_back(conn)


@dataclass
class OpenLoop:
    """Requests at a fixed rate whatever the latency (no coordinated omission): latency
    counts from each request's scheduled time. Bounded by count, in-flight and time."""

    pool: Pool
    request: bytes
    max_inflight: int = 2000
    samples: list[Sample] = field(default_factory=list)
    busy: set[Conn] = field(default_factory=set)
    inflight: int = 0
    overflow: bool = False

    def _done(self, conn: Conn, sample: Sample) -> None:
        self.busy.discard(conn)
        self.samples.append(sample)
        self.pool.give_back(conn)
        self._one_less()

    def _one_less(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def _send(self, conn: Conn, due: float) -> None:
        self.busy.add(conn)
        conn.send(self.request, Sample(due), self._done)

    def _fire(self, due: float) -> None:
        self.inflight += 1
        conn = self.pool.take()
        if conn is not None:
            self._send(conn, due)
        else:
            task = asyncio.ensure_future(self._connect_and_send(due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect_and_send(self, due: float) -> None:
        try:
            conn = await self.pool.connect()
        except (TimeoutError, OSError) as exc:
            self.samples.append(Sample(due, ended=time.perf_counter(), error=str(exc)))
            self._one_less()
            return
        self._send(conn, due)

    async def run(self, rate: float, seconds: float, drain: float = 5.0) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        start = time.perf_counter() + 0.005
        total = int(rate * seconds)
        fired = 0
        while fired < total and not self.overflow:
            now = time.perf_counter()
            due_count = min(total, int((now - start) * rate) + 1)
            for k in itertools.islice(itertools.count(fired), max(0, due_count - fired)):
                self._fire(start + k / rate)
            fired = max(fired, due_count)
            self.overflow = self.inflight > self.max_inflight
            await asyncio.sleep(0.0005)
        if self.inflight > 0:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain)
        for conn in list(self.busy):  # still unanswered after the drain: errors
            conn.abort("no answer within the drain time")
        for task in self._tasks:
            task.cancel()
