"""The streaming hot path: upstream chunks to the client's socket, unchanged.

One short loop: each chunk the network delivers is written as it arrives, with no
parsing, re-chunking or buffering. If the upstream fails after the stream has started,
the status can no longer change, so the client gets an explicit SSE error event rather
than a clean-looking truncated stream.
"""

from __future__ import annotations

from proxy.asgi import ClientWatch, Send
from proxy.errors import ProxyError
from proxy.headers import Headers
from proxy.upstream import UpstreamResponse


async def relay_stream(
    send: Send, response: UpstreamResponse, headers: Headers, watch: ClientWatch
) -> ProxyError | None:
    """Relay an SSE body; returns the upstream error that cut it short, if any."""
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    failure: ProxyError | None = None
    last = b"\n\n"
    try:
        async for chunk in response.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            last = chunk
    except ProxyError as exc:
        failure = exc
    finally:
        await response.aclose()
    watch.done = True
    tail = b"" if failure is None else sse_error_event(failure, at_boundary=last.endswith(b"\n\n"))
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return failure


def sse_error_event(error: ProxyError, *, at_boundary: bool) -> bytes:
    """`data: {"error": {...}}`, the shape OpenAI's SDKs raise from mid-stream.

    After a cut inside an event, a blank line first ends the partial event so the error
    arrives as an event of its own.
    """
    return (b"" if at_boundary else b"\n\n") + b"data: " + error.body() + b"\n\n"
