"""Shared fixtures: a real mock upstream and real proxies, each a uvicorn server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from proxy.app import create_app
from proxy.metering.estimate import tokenizer_available
from proxy.mock.pki import Pki, make_pki
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.serving import RunningServer, ServerTls
from tests.provider_shapes import Shapes, serve_shapes

# In-process estimates are exact from the first, as in a proxy whose config may need them
# (it loads the tokenizer at start-up): no test races the lazy load in a thread.
tokenizer_available()

# Random-looking, as real keys are: runs of 8 key characters are scrubbed from error answers,
# so a key spelt of words ("upstream") would take those words out of every error body.
UPSTREAM_KEY = "sk-9f3c1e7a-0123456789abcdef"

ROUTES = """\
server: {{max_body_bytes: {max_body}, body_timeout: {body_timeout}}}
upstreams:
  mock:
    base_url: {mock_url}/v1
    api_key: ${{MOCK_API_KEY}}
    timeouts: {{connect: 2, read: {read_timeout}, idle: {idle}, total: {total}}}
  verbatim:
    base_url: {mock_url}/v1
    stream_options: pass
  dead:
    base_url: http://127.0.0.1:{dead_port}/v1
    timeouts: {{connect: 1, read: 2}}
routes:
  - model: support-bot
    targets: [{{upstream: mock, model: mock-chat}}]
  - model: verbatim
    targets: [{{upstream: verbatim, model: mock-chat}}]
  - model: nowhere
    targets: [{{upstream: dead, model: mock-chat}}]
pricing:
  mock-chat: {{input: 0.28, cached_input: 0.028, output: 0.42}}
"""

ProxyFactory = Callable[..., RunningServer]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def mock_app() -> MockUpstream:
    return MockUpstream()


@pytest.fixture(scope="session")
def mock_server(mock_app: MockUpstream) -> Iterator[RunningServer]:
    with RunningServer(mock_app) as server:
        yield server


@pytest.fixture(scope="session")
def picky() -> Iterator[tuple[MockUpstream, RunningServer]]:
    """An upstream that rejects stream_options and reports usage in response headers only."""
    app = MockUpstream(Knobs(reject_stream_options=True, usage_headers=True))
    with RunningServer(app) as server:
        yield app, server


@pytest.fixture(scope="session")
def dead_port() -> Iterator[int]:
    """A loopback port with nothing listening: bound for the whole session but never
    listening, so connections are refused and no server started later can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def make_proxy(
    tmp_path: Path, mock_server: RunningServer, dead_port: int
) -> Iterator[ProxyFactory]:
    started: list[RunningServer] = []

    def factory(
        *,
        read_timeout: float = 10,
        max_body: int = 4194304,
        total: float | None = None,
        idle: float | None = None,
        body_timeout: float = 30,
    ) -> RunningServer:
        path = tmp_path / f"routes-{len(started)}.yaml"
        path.write_text(
            ROUTES.format(
                mock_url=mock_server.url,
                dead_port=dead_port,
                read_timeout=read_timeout,
                max_body=max_body,
                total="null" if total is None else total,
                idle="null" if idle is None else idle,
                body_timeout=body_timeout,
            )
        )
        server = RunningServer(create_app(path, env={"MOCK_API_KEY": UPSTREAM_KEY})).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def proxy(make_proxy: ProxyFactory) -> RunningServer:
    return make_proxy()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shapes]:
    """Providers' recorded streams replayed behind a real proxy (tests/provider_shapes.py)."""
    with serve_shapes(tmp_path_factory.mktemp("shapes")) as served:
        yield served


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA made for the run, a server certificate for 127.0.0.1 and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def https_mock(pki: Pki) -> Iterator[tuple[MockUpstream, RunningServer]]:
    """The mock upstream served over HTTPS with the run's CA."""
    app = MockUpstream()
    tls = ServerTls(str(pki.server_cert), str(pki.server_key))
    with RunningServer(app, tls=tls) as server:
        yield app, server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        if IN_CI:
            pytest.fail("chromium is missing in CI: scripts/test installs it as root")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Chromium's sandbox cannot start as root (CI containers).
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()
