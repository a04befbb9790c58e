"""The mock upstream's ASGI plumbing: whole answers, the lifespan, and how a stream opens
(its headers, keep-alive comments and the wait for its first token)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.types import Receive, Send

if TYPE_CHECKING:
    from proxy.mock.knobs import Knobs

KEEPALIVE = b": keep-alive\n\n"
JSON_TYPE = (b"content-type", b"application/json")
Headers = list[tuple[bytes, bytes]]


async def send_piece(send: Send, body: bytes, more: bool) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def open_stream(
    send: Send, knobs: Knobs, headers: Headers, keepalive: Callable[[], Awaitable[None]]
) -> None:
    """The stream's response headers, its keep-alive comments and the wait for its first
    token. Without keep-alives the headers wait for the first token, as real upstreams' do;
    with them the headers go at once so the comments have a response to ride on."""
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    if knobs.ttft and not knobs.keepalives:
        await asyncio.sleep(knobs.ttft)
    await send(start)
    if knobs.stall:
        await asyncio.sleep(knobs.stall)
    if knobs.keepalives:
        gap = knobs.ttft / (knobs.keepalives + 1)
        for _ in range(knobs.keepalives):
            await asyncio.sleep(gap)
            await keepalive()
        await asyncio.sleep(gap)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send: Send, status: int, body: bytes, extra: Headers | None = None) -> None:
    headers = [JSON_TYPE, (b"content-length", b"%d" % len(body)), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
