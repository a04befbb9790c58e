"""One client connection: uvicorn's httptools protocol, with the limits no peer may lift.

The models are nginx's `client_header_buffer_size`/`client_header_timeout` and Envoy's
`max_request_headers_kb`/`request_headers_timeout`:

- a request's head (request line and headers) is counted as its bytes arrive and refused with
  431 past `server.max_header_bytes`, before the parser sees more: httptools grows a header
  split over many reads by concatenation, so an unbounded one costs quadratic CPU;
- the head must be complete within `server.header_timeout` of the connection opening (or of its
  first byte, on a kept-alive connection), else 408 (or a quiet close if nothing came);
- past `server.max_connections` open connections, a new one is answered 503 with Retry-After
  and closed at once; the connections already open are untouched;
- an HTTP/1.0 client gets a body that ends when the connection closes: it cannot read chunks.

Each refusal is handed to the app's observer, if its lifespan left one in the lifespan state
under `REFUSED` (`proxy.observe.refusals`: a count and a log line); it never steers.

Once a head is complete nothing here runs per chunk: `data_received` compares one attribute
(and only for bytes the client sends), and the response path is uvicorn's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from proxy.config import ServerSettings
from proxy.errors import HeadersTooLarge, ProxyError, RequestTimeout, TooManyConnections
from proxy.headers import Headers

_DEFAULT = ServerSettings()
_REFUSED = -1  # `_head_left` once an answer to a refused connection is on its way
_RETRY: Headers = [(b"retry-after", b"1")]
REFUSED = "sluicegate.refused"  # the lifespan state's key for the refusal observer


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listener allows a peer; read once, when the listener starts."""

    max_header_bytes: int = _DEFAULT.max_header_bytes
    header_timeout: float = _DEFAULT.header_timeout
    max_connections: int | None = None  # None: no cap

    @classmethod
    def of(cls, server: ServerSettings) -> ConnectionLimits:
        cap = server.max_connections
        return cls(server.max_header_bytes, server.header_timeout, cap or open_file_share())


DEFAULT_LIMITS = ConnectionLimits()


def open_file_share() -> int | None:
    """The default connection cap: half the process's open-file limit, since each proxied
    request also holds an upstream socket. None when the limit is unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else max(1, soft // 2)


def guarded(limits: ConnectionLimits) -> Callable[..., GuardedHttp]:
    """The `http` protocol for uvicorn.Config (a partial, so multi-worker `serve` can pickle it)."""
    return functools.partial(GuardedHttp, limits=limits)


class GuardedHttp(HttpToolsProtocol):
    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._head_left: int | None = limits.max_header_bytes  # None: the head is complete
        self._head_since: float | None = None  # when the head being read began; None: none is
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cap = self._limits.max_connections
        if cap is not None and len(self.connections) >= cap:
            self.transport = transport
            full = TooManyConnections(f"sluicegate is serving its limit of {cap} connections")
            self._refuse(full, "max_connections", _RETRY)
            return
        super().connection_made(transport)
        self._head_begins()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        left = self._head_left
        if left is None:  # a body, or nothing in particular: the common case
            super().data_received(data)
        elif len(data) <= left:
            self._head_left = left - len(data)  # before parsing, which may complete the head
            super().data_received(data)
        elif left != _REFUSED:
            self._overflow(memoryview(data), left)

    def _overflow(self, data: memoryview, left: int) -> None:
        """Parses only what the head may still take; the rest only if the head completed."""
        self._head_left = 0
        if left:
            super().data_received(data[:left])  # type: ignore[arg-type]  # httptools takes views
        if self._head_left is None and not self.transport.is_closing():
            self.data_received(data[left:])
        elif self._head_left is not None and not self.transport.is_closing():
            limit = self._limits.max_header_bytes
            too_large = HeadersTooLarge(f"request line and headers exceed {limit} bytes")
            self._refuse(too_large, "max_header_bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_left is None:  # pipelined, or after a body left unread: from here on
            self._head_left = self._limits.max_header_bytes
        if self._head_since is None:  # a kept-alive connection's next request
            self._head_begins()

    def on_response_complete(self) -> None:
        # The request was read whole and nothing is queued: the next bytes start a head.
        between = self._head_left is None and not self.cycle.more_body and not self.pipeline
        super().on_response_complete()
        if between:
            self._head_left = self._limits.max_header_bytes

    def on_headers_complete(self) -> None:
        self._head_left = self._head_since = None  # the timer runs on: see _head_check
        super().on_headers_complete()
        cycle = self.cycle  # None, or the last one, when uvicorn hands the connection over
        if self.scope["http_version"] == "1.0" and cycle is not None and cycle.scope is self.scope:
            # The cycle is built inside uvicorn's method and its task holds it; changing its
            # class is the one way to give it other framing without copying that method.
            cycle.__class__ = _Http10Cycle

    def _head_begins(self) -> None:
        self._head_since = self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_check)

    def _head_check(self) -> None:
        """One timer per connection, not one per request: it is not cancelled when a head
        completes, and when it fires it looks at the head being read now, if any."""
        self._head_timer = None
        if self._head_since is None:
            return  # between requests (uvicorn's keep-alive timeout applies): the next re-arms
        if self.cycle is not None and not self.cycle.response_complete:
            self._head_since = None  # pipelined behind a response still being sent: its clock
            self._head_begins()  # starts again
            return
        left = self._head_since + self._limits.header_timeout - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_check)
            return
        if self._head_left == self._limits.max_header_bytes and self.cycle is None:
            self.transport.close()  # a silent connection: nobody to answer
            return
        timeout = self._limits.header_timeout
        late = RequestTimeout(f"the request headers did not arrive within {timeout:g} s")
        self._refuse(late, "header_timeout")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, error: ProxyError, reason: str, headers: Headers | None = None) -> None:
        """Answers before any app is called, and closes; later bytes are dropped unread.
        `reason` is the setting that refused it, for the observer."""
        self._head_left = _REFUSED
        self._stop_head_timer()
        self.transport.write(_response(error, headers or []))
        self.transport.close()
        observe = self.app_state.get(REFUSED)
        if observe is not None:
            with contextlib.suppress(Exception):  # an observer never breaks the connection
                observe(reason)


def _response(error: ProxyError, headers: Headers) -> bytes:
    body = error.body()
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, HTTPStatus(error.status).phrase.encode()),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Http10Cycle(RequestResponseCycle):
    """An HTTP/1.0 exchange: a body without Content-Length is sent as it is and ends with the
    connection (RFC 9112 §6.3), never chunked, which an HTTP/1.0 client cannot decode."""

    _to_close = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", ())}
            if b"content-length" not in names and self.scope["method"] != "HEAD":
                self._to_close = True
                self.chunked_encoding = False  # uvicorn's own choice would be chunked
        elif self._to_close and message["type"] == "http.response.body":
            await self._send_to_close(message)
            return
        await super().send(message)

    async def _send_to_close(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        self.transport.write(message.get("body", b""))
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()
