"""Config reload (file watch and SIGHUP) and graceful shutdown, on real servers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import GC_THRESHOLDS, create_app
from proxy.mock.upstream import MockUpstream, expected_content
from proxy.mock.upstream import RequestRecord as MockRecord
from proxy.reload import Reloader
from proxy.serving import RunningServer
from tests.conftest import ProxyFactory
from tests.helpers import sluicegate, wait_for
from tests.test_metrics import samples, value

ROOT = Path(__file__).resolve().parent.parent
HI = {"role": "user", "content": "hi"}


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
    assert _reloads(server.url) == {"error": reloader.refused, "ok": 0}
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
    watched: tuple[RunningServer, Path, Reloader],
    mock_server: RunningServer,
    mock_app: MockUpstream,
) -> None:
    server, path, reloader = watched
    knobs = {"tokens": 32, "delay": 0.02, "pause_after_first": 0.5}
    seen = len(mock_app.records)

    async def run() -> list[str]:
        async with _streams(server.url, range(200), knobs) as tasks:
            # Every stream has its first token before the edit, and none has ended when the
            # reload lands: it happened under load, not before or after it.
            assert await _until(lambda: _started(mock_app.records[seen:]) == 200)
            path.write_text(_config(mock_server.url, "bot", "bot-2"))
            assert await _until(lambda: reloader.applied == 1)
            assert [r.finished for r in mock_app.records[seen:]] == [None] * 200
            return await asyncio.gather(*tasks)

    bodies = asyncio.run(run())
    assert _reloads(server.url) == {"error": reloader.refused, "ok": 1}
    for seed, body in enumerate(bodies):
        assert body.endswith("data: [DONE]\n\n")
        assert expected_content(seed, 32) in _text(body)
    assert len(bodies) == 200


@pytest.mark.parametrize("change", ["base_url", "timeouts"])
def test_a_replaced_upstream_client_drains_its_streams_then_closes(
    tmp_path: Path, mock_server: RunningServer, mock_app: MockUpstream, change: str
) -> None:
    """An edit that changes `mock`'s definition gives it a new client. Streams already running
    on the old one must all complete, and the old client closes its connections once the
    drain is over, not before and not never."""
    other_app = MockUpstream()
    with RunningServer(other_app) as other:
        path = tmp_path / "routes.yaml"
        drain = "server: {drain_seconds: 2}\n"
        path.write_text(drain + _config(mock_server.url, "bot"))
        app = create_app(path, env={}, watch_interval=0.05)
        edited = _config(other.url if change == "base_url" else mock_server.url, "bot")
        if change == "timeouts":
            edited = edited.replace("/v1'}", "/v1', timeouts: {connect: 3, read: 30}}")
        knobs = {"tokens": 8, "delay": 0.02, "pause_after_first": 0.5}
        seen = len(mock_app.records)
        with RunningServer(app) as server:

            async def run() -> list[str]:
                async with _streams(server.url, range(20), knobs) as tasks:
                    assert await _until(lambda: _started(mock_app.records[seen:]) == 20)
                    path.write_text(drain + edited)
                    assert await _until(lambda: app.state.reloader.applied == 1)
                    assert [r.finished for r in mock_app.records[seen:]] == [None] * 20
                    # Their connections, open while they run, are what the drain must close.
                    assert {r.peer for r in mock_app.records[seen:]} <= mock_server.peers()
                    return await asyncio.gather(*tasks)

            bodies = asyncio.run(run())
            for seed, body in enumerate(bodies):
                assert body.endswith("data: [DONE]\n\n")
                assert expected_content(seed, 8) in _text(body)
            old = {r.peer for r in mock_app.records[seen:]}
            assert wait_for(lambda: not old & mock_server.peers(), 10)  # closed by the drain
            # A new request goes over the new client: to the other server, or a new connection.
            body = {"model": "bot", "messages": [HI]}
            assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
            assert (other_app if change == "base_url" else mock_app).records[-1].peer not in old


@contextlib.asynccontextmanager
async def _streams(
    url: str, seeds: range, knobs: dict[str, Any]
) -> AsyncIterator[list[asyncio.Future[str]]]:
    """One streamed `bot` request per seed, all at once; each task gives the body read."""

    async def one(client: httpx.AsyncClient, seed: int) -> str:
        body = {"model": "bot", "stream": True, "seed": seed, "messages": [HI], "mock": knobs}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            return (await r.aread()).decode()

    limits = httpx.Limits(max_connections=len(seeds) + 100)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        yield [asyncio.ensure_future(one(client, s)) for s in seeds]


async def _until(predicate: Callable[[], bool]) -> bool:
    """`wait_for` off the event loop, so the streams keep being read meanwhile."""
    return await asyncio.to_thread(wait_for, predicate)


def _started(records: list[MockRecord]) -> int:
    return sum(r.sent_tokens >= 1 for r in records)


def _text(body: str) -> str:
    chunks = [orjson.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return "".join(c["delta"].get("content") or "" for p in chunks for c in p["choices"])


def _reloads(url: str) -> dict[str, float]:
    got = samples(httpx.get(url + "/metrics", timeout=5).content)
    return {
        result: value(got, "sluicegate_config_reloads_total", result=result) or 0.0
        for result in ("error", "ok")
    }


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


def test_a_serving_proxy_collects_cycles_in_larger_steps(make_proxy: ProxyFactory) -> None:
    """Requests in flight grow the live objects by ~180 each: once serving, the young
    generation is collected every 10,000 of them, not CPython's 700 (issue 18)."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        make_proxy()
        assert gc.get_threshold() == GC_THRESHOLDS == (10_000, 100, 10)
    finally:
        gc.set_threshold(*before)


def test_a_request_leaves_no_cyclic_garbage(make_proxy: ProxyFactory) -> None:
    """What lets the middle generation be walked rarely (`GC_THRESHOLDS`): a request, streamed
    or not, frees everything of the proxy's by reference counting. The test process also runs
    the mock upstream and the client (whose httpx does leave cycles), so the cyclic garbage is
    kept (`DEBUG_SAVEALL`) and what belongs to the proxy picked out: objects of its modules or
    of aiohttp, and frames or coroutines of its code."""
    proxy = make_proxy()
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=proxy.url, timeout=20) as http:

        def requests(n: int) -> None:
            for i in range(n):
                answer = http.post("/v1/chat/completions", json={**body, "stream": i % 2 == 1})
                assert answer.status_code == 200

        requests(20)  # first uses: pools, caches
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            requests(200)
            gc.collect()
            ours = [_named(o) for o in gc.garbage if _of_the_proxy(o)]
            found = len(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert found > 0  # the client's cycles: the garbage was seen
    assert ours == []


_OURS = ("proxy.", "aiohttp.", "multidict", "yarl")
_PROXY_CODE = str(Path(create_app.__code__.co_filename).parent)


def _code_of(obj: object) -> Any:
    return getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)


def _of_the_proxy(obj: object) -> bool:
    code = _code_of(obj)
    if code is not None:
        return code.co_filename.startswith(_PROXY_CODE) and "/mock/" not in code.co_filename
    module = type(obj).__module__
    return module.startswith(_OURS) and not module.startswith("proxy.mock")


def _named(obj: object) -> str:
    code = _code_of(obj)
    return f"{code.co_filename}:{code.co_name}" if code is not None else type(obj).__qualname__
