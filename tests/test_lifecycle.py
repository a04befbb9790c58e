"""Config reload (file watch and SIGHUP) and graceful shutdown, on real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.mock.upstream import MockUpstream, expected_content
from proxy.reload import Reloader
from proxy.serving import RunningServer
from tests.helpers import sluicegate, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _config(mock_url: str, *models: str) -> str:
    routes = "".join(
        f"  - {{model: {m}, targets: [{{upstream: mock, model: mock-chat}}]}}\n" for m in models
    )
    return f"upstreams:\n  mock: {{base_url: '{mock_url}/v1'}}\nroutes:\n{routes}"


def _models(url: str) -> list[str]:
    return sorted(m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"])


@pytest.fixture
def watched(
    tmp_path: Path, mock_server: RunningServer
) -> Iterator[tuple[RunningServer, Path, Reloader]]:
    path = tmp_path / "routes.yaml"
    path.write_text(_config(mock_server.url, "bot"))
    app = create_app(path, env={}, watch_interval=0.05)
    with RunningServer(app) as server:
        yield server, path, app.state.reloader


def test_an_edit_takes_effect_without_a_restart(
    watched: tuple[RunningServer, Path, Reloader], mock_server: RunningServer
) -> None:
    server, path, reloader = watched
    path.write_text(_config(mock_server.url, "bot", "bot-2"))
    assert wait_for(lambda: _models(server.url) == ["bot", "bot-2"])
    assert reloader.applied >= 1
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "bot-2", "messages": [{"role": "user", "content": "hi"}], "seed": 2},
    )
    assert r.json()["choices"][0]["message"]["content"] == expected_content(2, 16)


def test_an_invalid_edit_is_refused_and_the_old_config_keeps_serving(
    watched: tuple[RunningServer, Path, Reloader],
) -> None:
    server, path, reloader = watched
    path.write_text(
        "upstreams: {}\nroutes: [{model: bot, targets: [{upstream: nope, model: x}]}]\n"
    )
    # >= 1: the watcher may also catch the file half-written, which is refused too.
    assert wait_for(lambda: reloader.refused >= 1)
    assert reloader.applied == 0
    assert _models(server.url) == ["bot"]
    body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200


def test_a_configmap_style_symlink_swap_is_seen(tmp_path: Path, mock_server: RunningServer) -> None:
    # Kubernetes mounts a ConfigMap as routes.yaml → ..data/routes.yaml, ..data → ..2026_x;
    # an update writes a new directory and swaps the ..data symlink atomically.
    first, second = tmp_path / "..v1", tmp_path / "..v2"
    first.mkdir()
    second.mkdir()
    (first / "routes.yaml").write_text(_config(mock_server.url, "bot"))
    (second / "routes.yaml").write_text(_config(mock_server.url, "bot", "swapped"))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
    app = create_app(tmp_path / "routes.yaml", env={}, watch_interval=0.05)
    with RunningServer(app) as server:
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        assert wait_for(lambda: app.state.reloader.applied == 1)
        assert _models(server.url) == ["bot", "swapped"]


def test_reload_under_load_loses_no_request(
    watched: tuple[RunningServer, Path, Reloader], mock_server: RunningServer
) -> None:
    server, path, reloader = watched

    async def one(client: httpx.AsyncClient, seed: int) -> str:
        body = {
            "model": "bot",
            "stream": True,
            "seed": seed,
            "messages": [{"role": "user", "content": "hi"}],
            "mock": {"tokens": 32, "delay": 0.02},
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            return (await r.aread()).decode()

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client, s)) for s in range(200)]
            await asyncio.sleep(0.3)
            path.write_text(_config(mock_server.url, "bot", "bot-2"))  # mid-flight
            return await asyncio.gather(*tasks)

    bodies = asyncio.run(run())
    assert reloader.applied >= 1
    assert all(b.endswith("data: [DONE]\n\n") for b in bodies)
    assert len(bodies) == 200


@pytest.fixture
def served(
    tmp_path: Path, mock_server: RunningServer
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    path = tmp_path / "routes.yaml"
    path.write_text("server: {drain_seconds: 20}\n" + _config(mock_server.url, "bot"))
    with sluicegate("serve", "--config", str(path), "--no-watch") as (proc, url):
        yield proc, url, path


def test_sighup_reloads(
    served: tuple[subprocess.Popen[bytes], str, Path], mock_server: RunningServer
) -> None:
    proc, url, path = served
    path.write_text(_config(mock_server.url, "bot", "after-hup"))
    time.sleep(0.3)  # --no-watch: nothing may change until the signal (checked just below)
    assert _models(url) == ["bot"]
    proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: _models(url) == ["after-hup", "bot"])


def test_sigterm_drains_open_streams_and_refuses_new_connections(
    served: tuple[subprocess.Popen[bytes], str, Path], mock_app: MockUpstream
) -> None:
    proc, url, _ = served
    seen = len(mock_app.records)

    async def one(client: httpx.AsyncClient, seed: int) -> bytes:
        body = {
            "model": "bot",
            "stream": True,
            "seed": seed,
            "messages": [{"role": "user", "content": "hi"}],
            "mock": {"ttft": 0.1, "tokens": 40, "delay": 0.05},
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            return await r.aread()

    async def run() -> list[bytes]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client, s)) for s in range(50)]
            assert await asyncio.to_thread(wait_for, lambda: len(mock_app.records) >= seen + 50)
            proc.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(200):  # new connections stop being accepted
                try:
                    async with httpx.AsyncClient(timeout=1) as fresh:
                        await fresh.get(url + "/healthz")
                # Refused outright, or accepted from the backlog and closed unanswered.
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                    refused = True
                    break
                await asyncio.sleep(0.01)
            assert refused
            return await asyncio.gather(*tasks)

    bodies = asyncio.run(run())
    assert len(bodies) == 50
    for seed, body in enumerate(bodies):
        assert body.endswith(b"data: [DONE]\n\n")
        assert expected_content(seed, 40).encode()[:4] in body
    # uvicorn re-raises the signal once drained, so the exit status is the conventional one.
    assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
