"""Small raw-ASGI helpers: read a bounded body, answer JSON, watch for a client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.errors import BodyTooLarge, ProxyError, RequestTimeout
from proxy.headers import Headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


async def read_body(scope: Scope, receive: Receive, limit: int, within: float) -> bytes:
    """The whole request body, refusing early (by Content-Length) or as soon as it exceeds
    limit; a client that trickles it for longer than `within` seconds gets a 408."""
    try:
        async with asyncio.timeout(within):
            return await _read_body(scope, receive, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {within:g} s") from None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone  # the client left before sending all of its request
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


# Paths whose rest is a name, not a route: the openai SDKs escape a model's `/` as `%2F`.
ESCAPABLE = (b"/v1/models/", b"/models/")


def escaped(scope: Scope) -> bool:
    """Whether the path was sent with percent-escapes. The server decodes them into
    scope["path"], so `/%6detrics` would route as `/metrics`: no path of ours needs an escape,
    and one that has any reaches none of them (they match byte for byte). Past an
    `ESCAPABLE` prefix they spell a model name, which can only be looked up."""
    raw = scope.get("raw_path") or b""
    return b"%" in raw and not raw.startswith(ESCAPABLE)


class ClientGone(Exception):
    """The client disconnected before its request was complete: nobody to answer."""


async def send_body(send: Send, status: int, body: bytes, headers: Headers) -> None:
    all_headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: ProxyError, extra: Headers | None = None) -> None:
    await send_body(send, error.status, error.body(), [*JSON_HEADERS, *(extra or ())])


class ClientWatch:
    """Cancels the handling task when the client disconnects before the response ends.

    uvicorn's `send` silently drops writes after a disconnect, so a relay waiting on a
    silent upstream would never notice; this watcher makes the upstream close promptly, or,
    with a `grace` in seconds, lets the answer run on (unsent) for that long at most.
    """

    __slots__ = ("_grace", "_task", "_timer", "_watcher", "client_gone", "done")

    def __init__(self, receive: Receive, grace: float | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._grace = grace
        self._timer: asyncio.TimerHandle | None = None
        self.client_gone = False
        self.done = False  # set just before the final send: from then on, leaving is normal
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # Ending quietly, not by raising: a CancelledError's traceback would hold this
            # frame, the watch and its task in a cycle that only the GC breaks.
            return
        if not self.done:
            self.client_gone = True
            if self._grace is None:
                self._task.cancel()
            else:
                self._timer = asyncio.get_running_loop().call_later(self._grace, self._expire)

    def _expire(self) -> None:
        if not self.done:
            self._task.cancel()

    def close(self) -> None:
        """After the response's last send, uvicorn's `receive` returns `http.disconnect` (the
        response is complete): the watcher ends on its own in the loop's next round, which a
        cancellation (an exception through three frames, ~10 µs) would only cost more. So it
        is cancelled only if it is still waiting then (the response ended some other way)."""
        self.done = True
        asyncio.get_running_loop().call_soon(self._stop)
        if self._timer is not None:
            self._timer.cancel()

    def _stop(self) -> None:
        if not self._watcher.done():
            self._watcher.cancel()
