"""The soak's upstreams: the mock (`proxy.mock.upstream`), and a resetting listener.

    python bench/soak_upstream.py --port 8901                   # the backup: no faults
    python bench/soak_upstream.py --port 8902 --faults --reset-port 8903

- `--faults`: the mock also obeys a request body's `"fault": {...}` knobs (`MockUpstream(
  faults=True)`). The proxy forwards the body unchanged to every candidate, so fault knobs in
  `"mock"` would fail the fallback too; under `"fault"` only this upstream obeys them and
  the fallback (started without `--faults`) answers what a healthy upstream would.
- The mock keeps a record of every request (the tests read them); a soak would grow it by
  hundreds of thousands, so only the latest are kept (`keep_records`).
- `--reset-port`: a listener that reads each request and resets the connection (RST, no
  answer): a reset before the response headers, which the ASGI mock cannot make.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct

import uvicorn
import uvloop

from proxy.mock.upstream import MockUpstream
from proxy.serving import fastest_http

KEEP_RECORDS = 256
MAX_HEAD = 64 * 1024


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
        MockUpstream(faults=faults, keep_records=KEEP_RECORDS),
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
