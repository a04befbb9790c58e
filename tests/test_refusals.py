"""Connections refused before a request reaches the app (proxy/connection.py) are counted and
logged (proxy/observe/refusals.py): through a real proxy, each limit's refusal shows in
`sluicegate_connections_refused_total{reason}` on /metrics and in a `connection_refused`
line; a flood logs one line per reason every ten seconds; a failing observer never breaks
the refusal."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.connection import REFUSED, ConnectionLimits
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.observe.refusals import HINTS, LOG_EVERY, REASONS, Refusals
from proxy.serving import RunningServer
from tests.helpers import wait_for
from tests.test_connection import _exchange, _head, _status
from tests.test_metrics import samples

ROUTES = """\
upstreams:
  mock: {{base_url: '{url}/v1'}}
routes:
  - {{model: bot, targets: [{{upstream: mock, model: m}}]}}
"""
NAME = "sluicegate_connections_refused_total"


@pytest.fixture(scope="module")
def mock() -> Iterator[RunningServer]:
    with RunningServer(MockUpstream(Knobs(ttft=0.0, delay=0.0))) as server:
        yield server


def _refused(url: str) -> dict[str, float]:
    got = samples(httpx.get(url + "/metrics").content)
    return {dict(labels)["reason"]: v for (name, labels), v in got.items() if name == NAME}


def _closed_after(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_each_refusal_is_counted_by_its_setting_and_logged(
    tmp_path: Path, mock: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(url=mock.url))
    limits = ConnectionLimits(max_header_bytes=1024, header_timeout=0.5, max_connections=3)
    app = create_app(path, env={}, watch_interval=None)
    with capture_logs() as logs, RunningServer(app, limits=limits) as proxy:
        assert _refused(proxy.url) == dict.fromkeys(REASONS, 0.0)  # every reason from zero
        assert _status(_exchange(proxy.port, _head(1025))[0]) == 431
        with socket.create_connection(("127.0.0.1", proxy.port)) as late:
            late.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # and no blank line
            assert _status(_closed_after(late).partition(b"\r\n\r\n")[0]) == 408
        # The connections before (the scrapes') are gone, so the cap counts only these.
        assert wait_for(lambda: not proxy.server.server_state.connections)
        with ExitStack() as stack:
            held = [
                stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port)))
                for _ in range(3)
            ]
            for sock in held:  # half a head each: they hold their places (for 0.5 s)
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            head, _ = _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert _status(head) == 503
        # (the held ones were closed by the client, within their 0.5 s: not refusals)
        assert _refused(proxy.url) == dict.fromkeys(REASONS, 1.0)
    lines = [e for e in logs if e["event"] == "connection_refused"]
    assert sorted(e["reason"] for e in lines) == sorted(REASONS)
    for line in lines:
        assert line["log_level"] == "warning"
        assert line["refused"] == 1
        assert line["hint"] == HINTS[line["reason"]]


def test_a_flood_logs_one_line_per_reason_every_ten_seconds_with_the_count() -> None:
    counted: list[str] = []
    now = [100.0]
    refusals = Refusals(counted.append, clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(5):
            refusals("max_connections")
        refusals("max_header_bytes")
        now[0] += LOG_EVERY - 0.1
        refusals("max_connections")  # still within the ten seconds
        now[0] += 0.1
        refusals("max_connections")  # due: this one and the five held since the first line
    assert counted == ["max_connections"] * 5 + ["max_header_bytes"] + ["max_connections"] * 2
    assert [(e["reason"], e["refused"]) for e in logs] == [
        ("max_connections", 1),
        ("max_header_bytes", 1),
        ("max_connections", 6),
    ]


def test_a_failing_observer_never_breaks_the_refusal() -> None:
    calls: list[str] = []

    def broken(reason: str) -> None:
        calls.append(reason)
        raise RuntimeError("observer bug")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {REFUSED: broken}

    limits = ConnectionLimits(max_header_bytes=1024)
    with RunningServer(Starlette(lifespan=lifespan), limits=limits) as server:
        head, body = _exchange(server.port, _head(1025))
        again, _ = _exchange(server.port, _head(1025))
    assert (_status(head), _status(again)) == (431, 431)
    assert b'"error"' in body
    assert calls == ["max_header_bytes", "max_header_bytes"]
