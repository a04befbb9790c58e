"""CORS: a browser app on an origin listed in `server.cors_origins` calls the proxy, preflight
and stream included, in headless Chromium from a page served on another port; an origin not
listed gets no grant (the browser blocks it); without `cors_origins` nothing changes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser

from proxy.app import create_app
from proxy.asgi import Receive, Scope, Send, send_body
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer

KEY = "sk-browser-3f9a1c7e5d2b"
ROUTES = """\
server: {{cors_origins: ['{origin}']}}
upstreams:
  mock: {{base_url: '{url}/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
keys:
  app: {{sha256: {sha}}}
"""
# What an app does with fetch, as the openai JS SDK does it in a browser: its key, JSON, the
# SDK's own x-stainless-* headers, a stream read to its end.
PAGE = b"""<!doctype html><script>
window.call = async ([url, key, stream]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {method: "POST", headers: {
      "authorization": "Bearer " + key, "content-type": "application/json",
      "x-stainless-lang": "js", "x-stainless-retry-count": "0"},
      body: JSON.stringify({model: "support-bot", stream,
                            messages: [{role: "user", content: "hi"}]})});
    return {status: r.status, rid: r.headers.get("x-request-id"), body: await r.text()};
  } catch (e) { return {error: String(e)}; }
};
</script>"""


async def page_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send_body(send, 200, PAGE, [(b"content-type", b"text/html")])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """The proxy, the listed page (127.0.0.1) and the same page on an origin not listed
    (localhost: another host name is another origin)."""
    with RunningServer(page_app) as page, RunningServer(MockUpstream()) as upstream:
        path = tmp_path_factory.mktemp("cors") / "routes.yaml"
        sha = hashlib.sha256(KEY.encode()).hexdigest()
        path.write_text(ROUTES.format(origin=page.url, url=upstream.url, sha=sha))
        with RunningServer(create_app(path, env={}, watch_interval=None)) as proxy:
            yield proxy.url, page.url, page.url.replace("127.0.0.1", "localhost")


def _in_browser(browser: Browser, page_url: str, proxy_url: str, stream: bool) -> Any:
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(page_url)
        return tab.evaluate("call", [proxy_url, KEY, stream])
    finally:
        context.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_listed_origin_calls_the_proxy_from_a_browser(
    browser: Browser, servers: tuple[str, str, str], stream: bool
) -> None:
    proxy, listed, _ = servers
    result = _in_browser(browser, listed, proxy, stream)
    assert result.get("error") is None
    assert result["status"] == 200
    assert len(result["rid"]) == 32  # an exposed header the page can read
    if stream:
        assert result["body"].endswith("data: [DONE]\n\n")
    else:
        assert '"chat.completion"' in result["body"]


def test_an_origin_not_listed_is_blocked_by_the_browser(
    browser: Browser, servers: tuple[str, str, str]
) -> None:
    proxy, _, other = servers
    assert _in_browser(browser, other, proxy, True) == {"error": "TypeError: Failed to fetch"}


def test_the_preflight_grants_the_listed_origin_and_the_headers_it_may_send(
    servers: tuple[str, str, str],
) -> None:
    proxy, listed, other = servers
    asked = "Authorization, Content-Type, X-Stainless-OS, traceparent, cookie, x-secret"
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": asked}
    r = httpx.options(proxy + "/v1/chat/completions", headers={"origin": listed, **preflight})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == listed
    assert r.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    allowed = "authorization, content-type, x-stainless-os, traceparent"
    assert r.headers["access-control-allow-headers"] == allowed
    assert r.headers["access-control-max-age"] == "600"
    assert r.headers["vary"] == "origin"
    refused = httpx.options(proxy + "/v1/chat/completions", headers={"origin": other, **preflight})
    assert refused.status_code == 405
    assert not [k for k in refused.headers if k.startswith("access-control-")]


def test_errors_carry_the_grant_too(servers: tuple[str, str, str]) -> None:
    proxy, listed, _ = servers
    for path, status in (("/v1/chat/completions", 401), ("/nowhere", 404)):
        r = httpx.post(proxy + path, json={}, headers={"origin": listed})
        assert r.status_code == status
        assert r.headers["access-control-allow-origin"] == listed
        assert "x-upstream-request-id" in r.headers["access-control-expose-headers"]


def test_without_cors_origins_there_is_no_cors_at_all(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams: {up: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "routes: [{model: m, targets: [{upstream: up, model: m}]}]\n"
    )
    origin = {"origin": "http://127.0.0.1:1", "access-control-request-method": "POST"}
    with RunningServer(create_app(path, env={}, watch_interval=None)) as proxy:
        preflight = httpx.options(proxy.url + "/v1/chat/completions", headers=origin)
        models = httpx.get(proxy.url + "/v1/models", headers=origin)
    assert preflight.status_code == 405
    assert models.status_code == 200
    for response in (preflight, models):
        assert not [k for k in response.headers if k.startswith("access-control-")]
