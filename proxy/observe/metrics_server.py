"""/metrics on a listener of its own, and the bearer token that may guard it wherever it is.

With `serve --metrics-port` (or `server.metrics_port`) the main app does not route /metrics
(404 there), and `MetricsApp` serves GET /metrics and GET /healthz on the metrics port, from a
thread of the `serve` process. With one worker that process is the proxy and the listener
renders its registry; with `--workers N` it is uvicorn's supervisor, which renders every
worker's multiprocess files: the totals of all workers, from one listener that no worker
restart takes away, and no port for N workers to fight over.

`server.metrics_token` (a config Secret) guards /metrics on whichever port serves it,
compared in constant time. The token and the listener's address are read once, at start-up.
"""

from __future__ import annotations

import glob
import hmac
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from proxy.asgi import JSON_HEADERS, Receive, Scope, Send, escaped, send_body, send_error
from proxy.config import Secret, ServerSettings
from proxy.errors import MethodNotAllowed, MetricsUnauthorized, NotFound, ProxyError
from proxy.headers import Headers
from proxy.observe.logs import get_logger
from proxy.serving import RunningServer

Render = Callable[[], tuple[bytes, str]]  # the exposition's body and content type
PATHS = ("/metrics", "/healthz")  # what the metrics listener serves
# Read once, when the listeners start (proxy.connection takes the last three).
FIXED_AT_START = (
    "metrics_port",
    "metrics_host",
    "metrics_token",
    "max_header_bytes",
    "header_timeout",
    "max_connections",
)
CHALLENGE: Headers = [(b"www-authenticate", b'Bearer realm="metrics"')]  # RFC 6750


class ListenError(Exception):
    """The metrics listener's address cannot be bound (taken, or not this host's)."""


def authorize(header: bytes | None, token: Secret | None) -> None:
    """Raises MetricsUnauthorized unless there is no token or `header` is `Bearer <token>`.
    Messages never quote what was sent: a near miss may be most of the real token."""
    if token is None:
        return
    if header is None:
        raise MetricsUnauthorized("/metrics needs `Authorization: Bearer <server.metrics_token>`")
    scheme, _, given = header.strip().partition(b" ")
    # compare_digest: the time taken does not tell how much of the token was right.
    right = hmac.compare_digest(given.strip(), token.reveal().encode())
    if not (right and scheme.lower() == b"bearer"):
        raise MetricsUnauthorized("the bearer token for /metrics is not the configured one")


class MetricsEndpoint:
    """GET /metrics as a raw ASGI app: the main app routes it, `MetricsApp` calls it."""

    def __init__(self, render: Render, token: Secret | None = None) -> None:
        self.render = render
        self.token = token  # the main app sets it once, when its lifespan has read the config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            authorize(_header(scope, b"authorization"), self.token)
            body, content_type = self.render()
        except MetricsUnauthorized as exc:
            await send_error(send, exc, CHALLENGE)
        except ProxyError as exc:  # not ready yet: 503
            await send_error(send, exc)
        else:
            await send_body(send, 200, body, [(b"content-type", content_type.encode())])


class MetricsApp:
    """The metrics listener: GET /metrics, GET /healthz (this process is up; it says nothing
    of the proxy's event loop), anything else an error in OpenAI's shape."""

    def __init__(self, render: Render, token: Secret | None) -> None:
        self.metrics = MetricsEndpoint(render, token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start (uvicorn accepts a return)
            return
        path, method = scope["path"], scope["method"]
        if path not in PATHS or escaped(scope):
            await send_error(send, NotFound("no such path; this port serves /metrics, /healthz"))
        elif method not in ("GET", "HEAD"):
            error = MethodNotAllowed("method not allowed for this path")
            await send_error(send, error, [(b"allow", b"GET, HEAD")])
        elif path == "/metrics":
            await self.metrics(scope, receive, send)
        else:
            await send_body(send, 200, b'{"status":"ok"}', JSON_HEADERS)


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listener(
    server: ServerSettings, host: str, port: int | None = None, bind: str | None = None
) -> Listener | None:
    """Where /metrics is served: `serve --metrics-port`/`--metrics-host` (`port`, `bind`) win
    over the file's `server.metrics_port`/`metrics_host`; the host defaults to the main `host`.
    None: on the main port, as before."""
    port = server.metrics_port if port is None else port
    if port is None:
        return None
    return Listener(bind or server.metrics_host or host, port)


def start(where: Listener | None, render: Render, token: Secret | None) -> RunningServer | None:
    """Binds and starts the listener in a thread (None: nothing to start). Call before the
    workers start, so a taken port stops `serve` at once; raises ListenError."""
    if where is None:
        return None
    try:
        server = RunningServer(MetricsApp(render, token), where.host, where.port)
    except OSError as exc:  # taken, or an address of another host (gaierror is an OSError)
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen for /metrics on {where}: {reason}") from None
    server.start()
    url = f"http://{where}/metrics"
    get_logger().info("metrics_listening", url=url, protected=token is not None)
    return server


def restart_needed(started: ServerSettings, now: ServerSettings) -> list[str]:
    """The settings a reload changed that only a restart applies (for a warning)."""
    return [f"server.{key}" for key in FIXED_AT_START if getattr(started, key) != getattr(now, key)]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def prepare_multiprocess_dir() -> str | None:
    """Call in the supervisor before starting N>1 workers (before they import anything).

    Creates a fresh directory, exports it as PROMETHEUS_MULTIPROC_DIR for the workers, and
    returns it for the caller to remove at exit. If the operator already set the variable,
    that directory is kept but emptied of old values (stale files would inflate the totals),
    and None is returned: it is not ours to remove.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(glob.escape(given), "*.db")):
            os.remove(path)
        return None
    path = tempfile.mkdtemp(prefix="sluicegate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
