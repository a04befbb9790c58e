"""Serve an ASGI app with uvicorn in a background thread on a loopback port.

For tests, benchmarks and the offline demo: the app runs for real (sockets, HTTP parser,
lifespan) while the calling thread stays free to act as the client. `serve --metrics-port`
runs its metrics listener this way too (on any host).
"""

from __future__ import annotations

import importlib.util
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from proxy.connection import DEFAULT_LIMITS, ConnectionLimits, guarded

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def fastest_http() -> str:
    return "httptools" if importlib.util.find_spec("httptools") else "auto"


def fastest_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "auto"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """Serve https: the server's PEM certificate and key; with `client_ca`, clients must
    present a certificate that CA signed (mTLS)."""

    cert_file: str
    key_file: str
    client_ca: str | None = None


class RunningServer:
    """`with RunningServer(app) as srv: httpx.get(srv.url + "/healthz")`."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        loop: str = "asyncio",
        limits: ConnectionLimits = DEFAULT_LIMITS,
        tls: ServerTls | None = None,
    ) -> None:
        # Binding here rather than letting uvicorn do it means port 0 resolves before start()
        # and a taken port fails in the caller's thread instead of as sys.exit in the server's.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it every keep-alive response waits out the peer's delayed ACK (40 ms).
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        scheme = "http" if tls is None else "https"
        where = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{where}:{self.port}"
        config = uvicorn.Config(
            app,
            loop=loop,
            http=guarded(limits),  # type: ignore[arg-type]  # a protocol factory
            log_level="warning",
            access_log=False,
            lifespan="auto",
            timeout_graceful_shutdown=1,
            server_header=False,  # no `server: uvicorn`, as on the main listener
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> RunningServer:
        """Return once the app's lifespan startup has finished and the socket is accepting."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        # `started` is set after lifespan startup and listen(); polling it is the only signal
        # uvicorn offers across threads.
        while not self.server.started:
            if not self._thread.is_alive():
                self._sock.close()
                raise RuntimeError("server exited during startup (lifespan startup failed?)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {START_TIMEOUT} s")
            time.sleep(0.005)
        return self

    def peers(self) -> set[tuple[str, int]]:
        """The client addresses of the connections open right now, idle keep-alive ones too:
        what a test reads to see that a client closed its connections."""
        connections = list(self.server.server_state.connections)  # one copy, under the GIL
        # Every HTTP protocol records its peer as `client` (not all declare it).
        addresses = (getattr(c, "client", None) for c in connections)
        return {address for address in addresses if address is not None}

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(STOP_TIMEOUT)
        self._sock.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
