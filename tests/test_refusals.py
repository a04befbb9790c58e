"""Connections refused before a request reaches the app (proxy/connection.py) are counted and
logged (proxy/observe/refusals.py): through a real proxy, each limit's refusal shows in
`sluicegate_connections_refused_total{reason}` on /metrics and in a `connection_refused`
line; a flood logs one line per reason every ten seconds; a failing observer never breaks
the refusal."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
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


@contextmanager
def _proxy(tmp: Path, mock: RunningServer, limits: ConnectionLimits) -> Iterator[RunningServer]:
    path = tmp / "routes.yaml"
    path.write_text(ROUTES.format(url=mock.url))
    with RunningServer(create_app(path, env={}, watch_interval=None), limits=limits) as proxy:
        yield proxy


def test_each_refusal_is_counted_by_its_setting_and_logged(
    tmp_path: Path, mock: RunningServer
) -> None:
    heads = ConnectionLimits(max_header_bytes=1024, header_timeout=0.5)
    cap = ConnectionLimits(max_connections=3)  # 10 s for a head: the held ones stay held
    with capture_logs() as logs:
        with _proxy(tmp_path, mock, heads) as proxy:
            assert _refused(proxy.url) == dict.fromkeys(REASONS, 0.0)  # every reason from 0
            assert _status(_exchange(proxy.port, _head(1025))[0]) == 431
            with socket.create_connection(("127.0.0.1", proxy.port)) as late:
                late.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # and no blank line
                assert _status(_closed_after(late).partition(b"\r\n\r\n")[0]) == 408
            with socket.create_connection(("127.0.0.1", proxy.port)) as silent:
                assert _closed_after(silent) == b""  # closed unanswered: not a refusal
            assert _refused(proxy.url) == {
                "max_header_bytes": 1,
                "header_timeout": 1,
                "max_connections": 0,
            }
        with _proxy(tmp_path, mock, cap) as proxy, ExitStack() as stack:
            open_now = proxy.server.server_state.connections
            assert wait_for(lambda: not open_now)  # the cap counts only the held ones
            for _ in range(3):
                held = stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port)))
                held.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head: it holds its place
            head, _ = _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert _status(head) == 503
            stack.close()
            assert wait_for(lambda: not open_now)  # room again, for the scrape
            assert _refused(proxy.url) == {
                "max_header_bytes": 0,
                "header_timeout": 0,
                "max_connections": 1,
            }
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


def test_a_failing_observer_never_breaks_the_refusal(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def broken(reason: str) -> None:
        calls.append(reason)
        raise RuntimeError("observer bug")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {REFUSED: broken}

    limits = ConnectionLimits(max_header_bytes=1024)
    with (
        caplog.at_level(logging.ERROR),
        RunningServer(Starlette(lifespan=lifespan), limits=limits) as server,
    ):
        head, body = _exchange(server.port, _head(1025))
        again, _ = _exchange(server.port, _head(1025))
    assert (_status(head), _status(again)) == (431, 431)
    assert b'"error"' in body
    assert calls == ["max_header_bytes", "max_header_bytes"]
    # An exception out of the protocol's callback would reach the loop's handler, which logs it.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
