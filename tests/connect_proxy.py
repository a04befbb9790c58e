"""A small HTTP CONNECT proxy on loopback for the egress tests: it tunnels bytes as they come,
optionally asks for Basic credentials (407 without them), and records every CONNECT."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Tunnel:
    target: str  # host:port from the CONNECT line
    authorization: str | None  # the Proxy-Authorization header as sent
    allowed: bool


class ConnectProxy:
    def __init__(self, authorization: str | None = None) -> None:
        self.authorization = authorization  # the Proxy-Authorization value to require
        self.tunnels: list[Tunnel] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            line, *fields = head.split("\r\n")
            method, target, _ = line.split(" ", 2)
            headers = dict(f.split(":", 1) for f in fields if ":" in f)
            given = {k.strip().lower(): v.strip() for k, v in headers.items()}
            auth = given.get("proxy-authorization")
            allowed = method == "CONNECT" and auth == self.authorization
            self.tunnels.append(Tunnel(target, auth, allowed))
            if not allowed:
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
                )
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()
