"""Header hygiene: what reaches the upstream and what comes back to the client."""

from __future__ import annotations

import httpx

from proxy.headers import client_response_headers, request_id, upstream_request_headers
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY

BODY = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_client_credentials_never_reach_the_upstream(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=BODY,
        headers={
            "authorization": "Bearer sk-client-secret",
            "cookie": "session=abc",
            "openai-organization": "org-123",
            "x-stainless-lang": "python",
            "x-request-id": "req-42",
        },
        timeout=10,
    )
    assert r.status_code == 200
    seen = mock_app.records[-1].headers
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "cookie" not in seen
    assert "openai-organization" not in seen
    assert "x-stainless-lang" not in seen
    assert seen["x-request-id"] == "req-42"
    assert seen["accept-encoding"] == "identity"
    assert r.headers["x-request-id"] == "req-42"
    assert "sk-client-secret" not in str(seen)


def test_request_id_is_generated_when_missing(proxy: RunningServer, mock_app: MockUpstream) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=10)
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    assert mock_app.records[-1].headers["x-request-id"] == rid


def test_request_id_rules() -> None:
    assert request_id([(b"x-request-id", b"abc-1")]) == b"abc-1"
    for bad in (b"", b"has space", b"x" * 129, "ü".encode()):
        generated = request_id([(b"x-request-id", bad)])
        assert generated != bad
        assert len(generated) == 32


def test_upstream_headers_are_an_allowlist() -> None:
    client = [
        (b"authorization", b"Bearer x"),
        (b"accept", b"text/event-stream"),
        (b"connection", b"keep-alive"),
        (b"cookie", b"a=b"),
    ]
    assert upstream_request_headers(client, b"rid") == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"rid"),
        (b"accept", b"text/event-stream"),
    ]


def test_client_headers_are_an_allowlist() -> None:
    upstream = [
        (b"Content-Type", b"text/event-stream; charset=utf-8"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"Content-Length", b"10"),
        (b"Set-Cookie", b"a=b"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"cache-control", b"private"),
        (b"X-Accel-Redirect", b"/internal"),
        (b"Location", b"https://elsewhere.test/"),
        (b"OpenAI-Processing-MS", b"12"),
        (b"Content-Encoding", b"gzip"),
        (b"X-Request-Id", b"upstream-id"),
        (b"Retry-After", b"2"),
    ]
    assert client_response_headers(upstream, b"rid") == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"openai-processing-ms", b"12"),
        (b"retry-after", b"2"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"x-upstream-request-id", b"upstream-id"),  # the upstream's own, to quote to it
        (b"x-request-id", b"rid"),
    ]
