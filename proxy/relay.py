"""The client's side of an admitted request: keep-alive comments while no answer has
committed, then the one way the response ends (an answer, or the error the client can still
be given).

The streaming hot path is `Reply.relay`: one short loop where each chunk the network delivers
goes through the tee (a marker scan) and is written as it arrives, with no parsing,
re-chunking or buffering. If the upstream fails after the answer committed, the status can no
longer change, so the client gets an explicit SSE error event rather than a clean-looking
truncated stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.answer import Answer
from proxy.asgi import ClientWatch, Send, send_body, send_error
from proxy.errors import ProxyError, UpstreamTimeout
from proxy.headers import Headers, client_response_headers
from proxy.metering.tee import Tee
from proxy.sse import BLANK_LINES, responses_error_event

if TYPE_CHECKING:  # the type only: `upstream` opens responses, `attempts` commits them
    from proxy.upstream import UpstreamResponse

KEEPALIVE = b": keep-alive\n\n"
SSE_TYPE = [(b"content-type", b"text/event-stream")]  # what keep-alives open


@dataclass(slots=True)
class Relayed:
    first_byte_at: float  # perf_counter when the answer's first bytes were handed to the socket
    failure: ProxyError | None = None  # what cut a committed stream short
    reason: str | None = None  # its metric word: reset | idle_timeout


class Reply:
    """One admitted request's response. It knows whether headers went out already (keep-alive
    comments open an SSE stream before any answer exists), and every way the response ends
    goes through `_end`, which marks the client watch done just before the last bytes: from
    then on, a client leaving is normal."""

    __slots__ = ("_opened", "_responses", "_send", "_watch")

    def __init__(self, send: Send, watch: ClientWatch, *, responses: bool = False) -> None:
        self._send, self._watch = send, watch
        self._opened = False
        self._responses = responses  # the Responses API: its own error event

    @property
    def opened(self) -> bool:
        """SSE headers (status 200) went out while waiting: only an error event can follow."""
        return self._opened

    def keepalives(self, every: float | None, rid: bytes) -> _Keepalives:
        """While the block waits for an answer, keep the client's connection alive: after
        `every` seconds SSE headers (with request id `rid`) go out, then a comment every
        `every` seconds (the proxy's own bytes, never an upstream's). Usually the answer comes
        first and this costs one timer (the headers are built only if it fires); with `every`
        None, nothing."""
        return _Keepalives(self, every, rid)

    async def _ping(self, every: float, rid: bytes) -> None:
        while True:
            if not self._opened:
                self._opened = True
                headers = client_response_headers(SSE_TYPE, rid)
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            await asyncio.sleep(every)

    async def whole(self, status: int, body: bytes, headers: Headers) -> None:
        """A complete response at once (only before anything went out)."""
        await self._end(send_body(self._send, status, body, headers))

    async def error(self, error: ProxyError, headers: Headers) -> None:
        """The proxy's error in OpenAI's JSON shape (only before anything went out)."""
        await self._end(send_error(self._send, error, headers))

    async def error_event(self, error: ProxyError) -> None:
        """No answer came after keep-alives opened the stream: an error event ends it."""
        await self._end_body(self._error_event(error, at_boundary=True, after=b""))

    async def relay(self, answer: Answer, headers: Headers, tee: Tee) -> Relayed:
        """Send a committed stream: its held head at once, then the rest as it arrives."""
        send, result = self._send, Relayed(0.0)
        if not self._opened:
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        head = tee.feed(answer.head)
        if answer.response is None:
            await self._end_body(head + tee.end())
            result.first_byte_at = time.perf_counter()
            return result
        await send({"type": "http.response.body", "body": head, "more_body": True})
        result.first_byte_at = time.perf_counter()
        # The rest in a task of its own, started only now so the first bytes did not wait
        # for it: each chunk then resumes the few frames of `_pump`, not the whole ASGI call
        # chain above. Cancelling this task (the client left) cancels that one.
        last = await asyncio.ensure_future(
            _pump(send, answer.response, tee, result, head or b"\n\n")
        )
        tail = tee.end()
        if result.failure is not None:
            after = tail or last
            tail += self._error_event(
                result.failure, at_boundary=after.endswith(BLANK_LINES), after=after
            )
        await self._end_body(tail)
        return result

    def _error_event(self, error: ProxyError, *, at_boundary: bool, after: bytes) -> bytes:
        if not self._responses:
            return sse_error_event(error, at_boundary=at_boundary)
        event = responses_error_event(error.code, error.message, error.param, after)
        return event if at_boundary else b"\n\n" + event

    async def _end_body(self, body: bytes) -> None:
        last = {"type": "http.response.body", "body": body, "more_body": False}
        await self._end(self._send(last))

    async def _end(self, sending: Awaitable[None]) -> None:
        """The response's last send, whatever it carries."""
        self._watch.done = True
        await sending


class _Keepalives:
    """`Reply.keepalives`: a plain async context manager (a generator-based one costs a few
    µs more per request)."""

    __slots__ = ("_every", "_pinger", "_reply", "_rid", "_timer")

    def __init__(self, reply: Reply, every: float | None, rid: bytes) -> None:
        self._reply, self._every, self._rid = reply, every, rid
        self._timer: asyncio.TimerHandle | None = None
        self._pinger: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        if self._every is not None:
            self._timer = asyncio.get_running_loop().call_later(self._every, self._start)

    def _start(self) -> None:
        assert self._every is not None
        self._pinger = asyncio.ensure_future(self._reply._ping(self._every, self._rid))

    async def __aexit__(self, *_exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger


async def _pump(
    send: Send, response: UpstreamResponse, tee: Tee, result: Relayed, last: bytes
) -> bytes:
    """The hot loop: each chunk as the network delivers it, through the tee, to the client.
    Returns the last bytes sent; a failure of the upstream is noted in `result`. It is
    `UpstreamResponse.next_chunk` inlined: per chunk, one frame fewer to resume and one call
    fewer."""
    feed = tee.feed
    read, silence = response.reader()
    now = silence.now
    try:
        while True:
            silence.since = now()
            try:
                chunk = await read()
            except Exception as exc:
                raise response.read_error(exc) from None
            silence.since = None
            if not chunk:
                silence.stop()
                break
            out = feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                last = out
    except ProxyError as exc:
        result.failure = exc
        result.reason = "idle_timeout" if isinstance(exc, UpstreamTimeout) else "reset"
    return last


def sse_error_event(error: ProxyError, *, at_boundary: bool) -> bytes:
    """`data: {"error": {...}}`, the shape OpenAI's SDKs raise from mid-stream (the Responses
    API has its own `event: error`, `sse.responses_error_event`).

    After a cut inside an event, a blank line first ends the partial event so the error
    arrives as an event of its own.
    """
    return (b"" if at_boundary else b"\n\n") + b"data: " + error.body() + b"\n\n"
