"""The soak's upstreams: `proxy.mock_upstream` with two changes, and a resetting listener.

    python bench/soak_upstream.py --port 8901                   # the backup: no faults
    python bench/soak_upstream.py --port 8902 --faults --reset-port 8903

- With `--faults`, a request body's `"fault": {...}` object is merged into its `"mock"`
  knobs. The proxy forwards the body unchanged to every candidate, so fault knobs in
  `"mock"` would fail the fallback too; under `"fault"` only this upstream obeys them and
  the fallback (started without `--faults`) answers what a healthy upstream would.
- The mock keeps a record of every request (the tests read them); a soak would grow it by
  hundreds of thousands, so only the latest are kept.
- `--reset-port`: a listener that reads each request and resets the connection (RST, no
  answer): a reset before the response headers, which the ASGI mock cannot make.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct

import orjson
import uvicorn
import uvloop
from starlette.types import Message, Receive, Scope, Send

from proxy.mock.upstream import MockUpstream
from proxy.serving import fastest_http

KEEP_RECORDS = 256
MAX_HEAD = 64 * 1024


class SoakUpstream:
    """The mock behind a body rewrite (`fault` into `mock`) and a bound on its records."""

    def __init__(self, faults: bool) -> None:
        self.mock, self.faults = MockUpstream(), faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self.faults and scope["type"] == "http" and scope["method"] == "POST":
                receive = await _with_faults(receive)
            await self.mock(scope, receive, send)
        finally:
            if len(self.mock.records) > 2 * KEEP_RECORDS:
                del self.mock.records[:-KEEP_RECORDS]


async def _with_faults(receive: Receive) -> Receive:
    """The request body read whole, its `fault` knobs moved into `mock`, replayed once."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _replay(message, receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("fault"), dict):
            mock = data.get("mock") if isinstance(data.get("mock"), dict) else {}
            data["mock"] = {**mock, **data.pop("fault")}
            body = orjson.dumps(data)
    return _replay({"type": "http.request", "body": body, "more_body": False}, receive)


def _replay(first: Message, receive: Receive) -> Receive:
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one request, then close with SO_LINGER 0: an RST instead of a FIN."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve(port: int, faults: bool, reset_port: int | None) -> None:
    config = uvicorn.Config(
        SoakUpstream(faults),
        host="127.0.0.1",
        port=port,
        loop="none",
        http=fastest_http(),
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
    resetter = None
    if reset_port is not None:
        resetter = await asyncio.start_server(_reset, "127.0.0.1", reset_port, limit=MAX_HEAD)
    try:
        await uvicorn.Server(config).serve()
    finally:
        if resetter is not None:
            resetter.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--faults", action="store_true", help="obey the body's `fault` knobs")
    parser.add_argument("--reset-port", type=int, help="also reset every connection here")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.faults, args.reset_port))


if __name__ == "__main__":
    main()
