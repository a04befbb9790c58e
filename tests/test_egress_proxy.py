"""Egress through an HTTP CONNECT proxy (tests/connect_proxy.py) to an HTTPS upstream: the
per-upstream `proxy:` URL with credentials from the environment, HTTPS_PROXY and NO_PROXY."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.config import ConfigError, parse_config
from proxy.mock.pki import Pki
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.connect_proxy import ConnectProxy

PASSWORD = "pr0xy-S3cret-9f8e7d6c5b4a"
BASIC = "Basic " + base64.b64encode(f"egress:{PASSWORD}".encode()).decode()
ROUTES = """\
upstreams:
  far:
    base_url: {url}/v1
    tls: {{ca_file: {ca}}}
{proxy}
routes:
  - model: bot
    targets: [{{upstream: far, model: mock-chat}}]
"""


def _answer(
    tmp_path: Path, pki: Pki, upstream: RunningServer, proxy: str, env: dict[str, str]
) -> tuple[httpx.Response, list[RequestRecord], list[object]]:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(url=upstream.url, ca=pki.ca, proxy=proxy))
    records: list[RequestRecord] = []
    app = create_app(path, env=env, observers=[records.append])
    with capture_logs() as logs, RunningServer(app) as server:
        body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)
    return answer, records, list(logs)


def _tunnelled_to(upstream: RunningServer) -> str:
    return upstream.url.removeprefix("https://")


@pytest.mark.parametrize("password", [PASSWORD, "wrong-password-0123"], ids=["right", "wrong"])
def test_a_per_upstream_proxy_carries_the_request_and_never_shows_its_password(
    tmp_path: Path, pki: Pki, https_mock: tuple[MockUpstream, RunningServer], password: str
) -> None:
    app, server = https_mock
    seen = len(app.records)
    line = "    proxy: http://egress:${EGRESS_PASSWORD}@{where}"
    with ConnectProxy(authorization=BASIC) as egress:
        where = egress.url.removeprefix("http://")
        env = {"EGRESS_PASSWORD": password}
        answer, records, logs = _answer(tmp_path, pki, server, line.replace("{where}", where), env)
    # One CONNECT per attempt (a refused proxy is a connect error: retried like one).
    assert len(egress.tunnels) == len(records[0].attempts)
    assert {t.target for t in egress.tunnels} == {_tunnelled_to(server)}
    secret_basic = base64.b64encode(f"egress:{password}".encode()).decode()
    assert egress.tunnels[0].authorization == f"Basic {secret_basic}"
    if password == PASSWORD:
        assert answer.status_code == 200
        assert len(app.records) == seen + 1
    else:
        assert answer.status_code == 502
        assert answer.json()["error"]["message"] == (
            "upstream 'far' is unreachable: its proxy answered 407"
        )
    shown = repr(logs) + answer.text + repr([r.fields() for r in records])
    assert password not in shown
    assert secret_basic not in shown


def test_https_proxy_from_the_environment_and_no_proxy_bypassing_it(
    tmp_path: Path,
    pki: Pki,
    https_mock: tuple[MockUpstream, RunningServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, server = https_mock
    with ConnectProxy(authorization=BASIC) as egress:
        where = egress.url.removeprefix("http://")
        monkeypatch.setenv("HTTPS_PROXY", f"http://egress:{PASSWORD}@{where}")
        answer, _, logs = _answer(tmp_path, pki, server, "", {})
        assert answer.status_code == 200
        assert [t.target for t in egress.tunnels] == [_tunnelled_to(server)]
        assert egress.tunnels[0].authorization == BASIC
        assert PASSWORD not in repr(logs)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        answer, _, _ = _answer(tmp_path, pki, server, "", {})
        assert answer.status_code == 200
        assert len(egress.tunnels) == 1  # went direct


def _config(proxy: str) -> str:
    return ROUTES.format(url="https://far.example", ca="null", proxy=f"    proxy: {proxy}")


@pytest.mark.parametrize(
    "proxy",
    [
        "http://user:${EGRESS_PASSWORD}@proxy.corp:3128",
        "http://proxy.corp:3128",
    ],
)
def test_a_proxy_url_is_kept_as_a_secret(proxy: str) -> None:
    config = parse_config(_config(proxy), "routes.yaml", {"EGRESS_PASSWORD": PASSWORD})
    assert config.upstreams["far"].proxy is not None
    assert PASSWORD not in repr(config)


@pytest.mark.parametrize(
    "proxy",
    [
        "socks5://user:${EGRESS_PASSWORD}@proxy.corp:1080",
        "http://user:${EGRESS_PASSWORD}@proxy.corp:99999",
        "http://user:${EGRESS_PASSWORD}@proxy.corp:3128/path",
    ],
)
def test_a_wrong_proxy_url_is_refused_without_echoing_it(proxy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(proxy), "routes.yaml", {"EGRESS_PASSWORD": PASSWORD})
    assert [i.path for i in caught.value.issues] == ["upstreams.far.proxy"]
    assert "expected http://[user:password@]host:port" in str(caught.value)
    assert PASSWORD not in str(caught.value)
