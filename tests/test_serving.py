"""`RunningServer`: an ASGI app served for real on a loopback port in a background thread."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer
from tests.helpers import wait_for


def test_running_server_waits_for_lifespan_startup() -> None:
    state: dict[str, bool] = {}

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(0.2)
                state["ready"] = True
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                state["down"] = True
                return

    server = RunningServer(lifespan_app)
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    with server:
        assert state.get("ready")
    assert state.get("down")


def test_running_server_lists_its_open_connections_and_a_record_names_its_own(
    mock_server: RunningServer, mock_app: MockUpstream
) -> None:
    server = mock_server
    body = {"model": "mock-gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        assert client.post(server.url + "/v1/chat/completions", json=body).status_code == 200
        peer = mock_app.records[-1].peer
        assert peer is not None
        assert peer[0] == "127.0.0.1"
        assert peer in server.peers()  # kept alive after the answer
    assert wait_for(lambda: peer not in server.peers(), 5)
