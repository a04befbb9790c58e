"""A lean OpenAI-compatible upstream for benchmarks: raw asyncio protocol on uvloop.

Same SSE bytes as `sluicegate mock-upstream` (both build them with `proxy.mock_content`),
the same three timing knobs in the body's `"mock": {"ttft", "tokens", "delay"}`, and the
same write pattern (headers, role event and each content event as separate writes), but
no ASGI server, no task per request and one timer callback per event, so that on the
shared load-generator core it costs a fraction of what the proxy under test does.

    python bench/lean_upstream.py --port 8901
    python bench/lean_upstream.py --port 8901 --tls-port 8902 --cert server.pem --key server.key

With `--tls-port` it also serves HTTPS there (the same answers); `GET /stats` counts the
connections each port accepted (and the TLS versions), so a benchmark can check that its
clients reuse them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
from functools import lru_cache
from typing import Any, cast

import orjson
import uvloop

from proxy.mock.content import Plan, completion_body, plan_request, stream_events

DEFAULTS = {"ttft": 0.05, "tokens": 16, "delay": 0.005}  # those of proxy.mock.knobs.Knobs
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
MAX_HEAD = 64 * 1024


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


HEALTH = response(b"200 OK", b'{"status":"ok"}')
NOT_FOUND = response(b"404 Not Found", b'{"error":{"message":"not found"}}')


def bad_request(message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return response(b"400 Bad Request", body)


@lru_cache(maxsize=256)
def framed_stream(plan: Plan) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """(role, content events, the end: final [+ usage] + [DONE] + last chunk), chunk-framed."""
    events = stream_events(plan.seed, plan.model, plan.tokens, plan.finish, plan.include_usage)
    end = [events.final]
    if plan.include_usage:
        end.append(events.usage_event(plan.prompt_tokens, plan.tokens))
    end.append(events.done)
    return (
        chunk(events.role),
        tuple(chunk(e) for e in events.content),
        b"".join(chunk(e) for e in end) + LAST_CHUNK,
    )


def knobs(body: dict[str, Any]) -> tuple[float, int, float]:
    given = body.get("mock") or {}
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"the lean mock has no knob {sorted(unknown)}")
    merged = {**DEFAULTS, **given}
    return float(merged["ttft"]), int(merged["tokens"]), float(merged["delay"])


class Upstream(asyncio.Protocol):
    """One client connection: requests one at a time, each answered by timer callbacks."""

    def __init__(self, accepted: dict[str, int], kind: str) -> None:
        accepted[kind] += 1
        self.accepted = accepted
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.pending: tuple[bytes, tuple[bytes, ...], bytes] = (b"", (), b"")
        self.next_event = 0
        self.delay = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:  # handshake done: count the protocol version it settled on
            self.accepted[tls.version()] = self.accepted.get(tls.version(), 0) + 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD and self.transport is not None:
                self.transport.close()
            return
        head = self.buf[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4 : end + 4 + length]
        self.buf = self.buf[end + 4 + length :]
        method, path = head[0].split(" ")[:2]
        self.busy = True
        self.route(method, path, body)

    def route(self, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path == "/v1/chat/completions":
            try:
                self.chat(orjson.loads(body))
            except (ValueError, TypeError) as exc:
                self.finish(bad_request(str(exc)))
        elif method == "GET" and path == "/healthz":
            self.finish(HEALTH)
        elif method == "GET" and path == "/stats":
            self.finish(response(b"200 OK", orjson.dumps({"connections": self.accepted})))
        else:
            self.finish(NOT_FOUND)

    def chat(self, body: dict[str, Any]) -> None:
        ttft, tokens, delay = knobs(body)
        plan = plan_request(body, tokens)
        if not plan.stream:
            json_body = completion_body(
                plan.seed, plan.model, plan.tokens, plan.finish, plan.prompt_tokens
            )
            answer = response(b"200 OK", json_body)
            self.timer = self.loop.call_later(ttft + plan.tokens * delay, self.finish, answer)
            return
        self.pending = framed_stream(plan)
        self.next_event, self.delay = 0, delay
        self.timer = self.loop.call_later(ttft, self.first)

    def first(self) -> None:
        if self.transport is None:
            return
        self.transport.write(SSE_HEAD)
        self.transport.write(self.pending[0])
        self.emit()

    def emit(self) -> None:
        transport, content = self.transport, self.pending[1]
        if transport is None:
            return
        if self.next_event < len(content):
            transport.write(content[self.next_event])
            self.next_event += 1
            if self.next_event < len(content):
                self.timer = self.loop.call_later(self.delay, self.emit)
                return
        self.finish(self.pending[2])

    def finish(self, data: bytes) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(data)
        self.busy = False
        if self.buf:
            self.next_request()


async def serve(host: str, port: int, tls_port: int, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    accepted = {"plain": 0, "tls": 0}
    servers = [
        await loop.create_server(
            lambda: Upstream(accepted, "plain"), host, port, backlog=4096, reuse_address=True
        )
    ]
    if tls is not None:
        servers.append(
            await loop.create_server(
                lambda: Upstream(accepted, "tls"),
                host,
                tls_port,
                backlog=4096,
                reuse_address=True,
                ssl=tls,
            )
        )
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8901)
    parser.add_argument("--tls-port", type=int, default=0, help="also serve HTTPS here")
    parser.add_argument("--cert", help="the HTTPS server's PEM certificate")
    parser.add_argument("--key", help="and its key")
    args = parser.parse_args()
    tls = None
    if args.tls_port:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    uvloop.run(serve(args.host, args.port, args.tls_port, tls))


if __name__ == "__main__":
    main()
