"""The floor of sluicegate's stack: the thinnest streaming relay on the same uvicorn
(httptools, uvloop) and aiohttp client, with nothing of a proxy's work: no routing, no
commit hold-back, no metering, no logs, no timeouts. What it adds over a direct connection
is what the two libraries cost per request and per chunk; sluicegate can only add to it.
A non-stream answer is read whole and sent with its length, as sluicegate sends one (so
that a failure while reading can still become an error status): the floor of the
non-stream relay.

    python bench/floor_relay.py --upstream http://127.0.0.1:8901 --port 8902

Streams POST bodies to `<upstream>/v1/chat/completions` with `"model": "bench"` renamed to
`mock-chat` (the lean mock's model), and answers /healthz. Benchmarks only.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class FloorRelay:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/v1/chat/completions"
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["path"] == "/healthz":
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            await self.relay(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=0)
                self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay(self, receive: Receive, send: Send) -> None:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(parts).replace(b'"bench"', b'"mock-chat"', 1)
        assert self.session is not None
        headers = {"content-type": "application/json"}
        async with self.session.post(self.url, data=body, headers=headers) as response:
            content_type = response.headers.get("content-type", "")
            start = [(b"content-type", content_type.encode())]
            if not content_type.startswith("text/event-stream"):
                whole = await response.read()
                start.append((b"content-length", str(len(whole)).encode()))
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": start}
                )
                await send({"type": "http.response.body", "body": whole})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": start})
            while chunk := await response.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=8902)
    args = parser.parse_args()
    uvicorn.run(
        FloorRelay(args.upstream),
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
