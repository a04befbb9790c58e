"""The streaming hot path: a committed answer's bytes to the client's socket.

One short loop: each chunk the network delivers goes through the tee (a marker scan) and is
written as it arrives, with no parsing, re-chunking or buffering. If the upstream fails after
the answer committed, the status can no longer change, so the client gets an explicit SSE
error event rather than a clean-looking truncated stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.asgi import ClientWatch, Send
from proxy.attempts import Answer
from proxy.errors import ProxyError, UpstreamTimeout
from proxy.headers import Headers
from proxy.metering.tee import Tee


@dataclass(slots=True)
class Relayed:
    first_byte_at: float  # perf_counter when the answer's first bytes were handed to the socket
    failure: ProxyError | None = None  # what cut a committed stream short
    reason: str | None = None  # its metric word: reset | idle_timeout


async def relay(
    send: Send, answer: Answer, headers: Headers, watch: ClientWatch, tee: Tee, *, opened: bool
) -> Relayed:
    """Send a committed answer: its held head at once, then the rest as it arrives.

    `opened`: the proxy already sent SSE headers (and keep-alive comments) while waiting."""
    result = Relayed(0.0)
    last = b"\n\n"  # the last bytes sent: does a cut fall between events?
    try:
        if not opened:
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        head = tee.feed(answer.head)
        more = answer.next_chunk is not None
        if not more:
            head += tee.end()
            watch.done = True
        await send({"type": "http.response.body", "body": head, "more_body": more})
        result.first_byte_at = time.perf_counter()
        if answer.next_chunk is None:
            return result
        # The rest in a task of its own, started only now so the first bytes did not wait
        # for it: each chunk then resumes the few frames of `_pump`, not the whole ASGI call
        # chain above. Cancelling this task (the client left) cancels that one.
        last = await asyncio.ensure_future(
            _pump(send, answer.next_chunk, tee, result, head or last)
        )
    finally:
        if answer.response is not None:
            await answer.response.aclose()
    tail = tee.end()
    if result.failure is not None:
        tail += sse_error_event(result.failure, at_boundary=(tail or last).endswith(b"\n\n"))
    watch.done = True
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return result


async def _pump(
    send: Send, read: Callable[[], Awaitable[bytes]], tee: Tee, result: Relayed, last: bytes
) -> bytes:
    """The hot loop: each chunk as the network delivers it, through the tee, to the client.
    Returns the last bytes sent; a failure of the upstream is noted in `result`."""
    feed = tee.feed
    try:
        while chunk := await read():
            out = feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                last = out
    except ProxyError as exc:
        result.failure = exc
        result.reason = "idle_timeout" if isinstance(exc, UpstreamTimeout) else "reset"
    return last


KEEPALIVE = b": keep-alive\n\n"


async def open_stream(send: Send, headers: Headers) -> None:
    """SSE response headers before any answer exists: only for keep-alive comments."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def send_comment(send: Send) -> None:
    await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})


async def end_with_error(send: Send, error: ProxyError) -> None:
    """The answer failed after the proxy had opened the stream: an error event, then the end."""
    body = sse_error_event(error, at_boundary=True)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def sse_error_event(error: ProxyError, *, at_boundary: bool) -> bytes:
    """`data: {"error": {...}}`, the shape OpenAI's SDKs raise from mid-stream.

    After a cut inside an event, a blank line first ends the partial event so the error
    arrives as an event of its own.
    """
    return (b"" if at_boundary else b"\n\n") + b"data: " + error.body() + b"\n\n"
