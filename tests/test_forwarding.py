"""Which headers reach each upstream, by its `forward_headers:`, `headers:` and `query:`, with
the real openai SDK's `default_headers`/`extra_headers` as the client; what comes back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.config import Secret, Upstream
from proxy.headers import Forwarding, client_response_headers, upstream_request_headers
from proxy.mock.upstream import MockUpstream, RequestRecord
from proxy.scrub import scrub_key
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY

AZURE_KEY = "azk-5b1e9c0d7a2f4e6b8c3d"
CLIENT_KEY = "sk-client-7d2e4f6a8b0c"
ROUTES = """\
upstreams:
  plain: {{base_url: '{url}/v1', api_key: '${{MOCK_API_KEY}}'}}
  teams:
    base_url: {url}/v1
    api_key: ${{MOCK_API_KEY}}
    forward_headers: [x-team-*, openai-organization, x-only]
    headers: {{HTTP-Referer: 'https://app.example', X-Title: My App, x-only: fixed}}
  azure:
    base_url: {url}/openai/deployments/gpt-4o
    query: {{api-version: 2024-10-21}}
    headers: {{api-key: '${{AZURE_KEY}}'}}
routes:
  - {{model: plain, targets: [{{upstream: plain, model: m}}]}}
  - {{model: teams, targets: [{{upstream: teams, model: m}}]}}
  - {{model: azure, targets: [{{upstream: azure, model: m}}]}}
"""
CLIENT_HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=abc",
    "baggage": "user.id=42",
    "idempotency-key": "idem-1",
    "x-team-id": "blue",
    "x-team-cost-center": "cc-9",
    "x-only": "from-client",
    "x-other": "no",
    "cookie": "session=abc",
    "proxy-authorization": "Basic eDp5",
    "x-request-id": "req-7",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MockUpstream, str]]:
    mock = MockUpstream()
    with RunningServer(mock) as upstream:
        path = tmp_path_factory.mktemp("forwarding") / "routes.yaml"
        path.write_text(ROUTES.format(url=upstream.url))
        env = {"MOCK_API_KEY": UPSTREAM_KEY, "AZURE_KEY": AZURE_KEY}
        with RunningServer(create_app(path, env=env, watch_interval=None)) as proxy:
            yield mock, proxy.url


def _call(served: tuple[MockUpstream, str], model: str, **extra: Any) -> RequestRecord:
    mock, url = served
    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key=CLIENT_KEY,
        organization="org-client",  # sent as OpenAI-Organization
        project="proj-client",
        max_retries=0,
        default_headers=CLIENT_HEADERS,
    )
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **extra
    )
    return mock.records[-1]


def _credentials_stay(seen: dict[str, str]) -> None:
    assert CLIENT_KEY not in str(seen)
    assert "cookie" not in seen
    assert "proxy-authorization" not in seen


def test_the_defaults_forward_trace_context_and_the_idempotency_key_only(
    served: tuple[MockUpstream, str],
) -> None:
    seen = _call(served, "plain").headers
    for name in ("traceparent", "tracestate", "idempotency-key"):
        assert seen[name] == CLIENT_HEADERS[name]
    assert seen["user-agent"].startswith("OpenAI/Python")
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["x-request-id"] == "req-7"
    for name in ("baggage", "openai-organization", "openai-project", "x-team-id", "x-other"):
        assert name not in seen
    _credentials_stay(seen)


def test_forward_rules_add_names_and_patterns_and_static_headers_win(
    served: tuple[MockUpstream, str],
) -> None:
    seen = _call(served, "teams", extra_headers={"X-Team-Region": "eu"}).headers
    assert seen["x-team-id"] == "blue"
    assert seen["x-team-cost-center"] == "cc-9"
    assert seen["x-team-region"] == "eu"
    assert seen["openai-organization"] == "org-client"
    assert seen["x-only"] == "fixed"  # one value: the config's, not "fixed, from-client"
    assert seen["http-referer"] == "https://app.example"
    assert seen["x-title"] == "My App"
    assert "x-other" not in seen
    assert "openai-project" not in seen
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    _credentials_stay(seen)


def test_azure_gets_its_path_query_and_api_key_and_no_bearer(
    served: tuple[MockUpstream, str],
) -> None:
    with capture_logs() as events:
        record = _call(served, "azure")
    assert record.target == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    assert record.headers["api-key"] == AZURE_KEY
    assert "authorization" not in record.headers
    _credentials_stay(record.headers)
    assert events  # the access log line was captured, and holds no key
    assert AZURE_KEY not in str(events)


def test_the_upstreams_request_id_comes_back_beside_the_proxys() -> None:
    for name in (b"x-request-id", b"request-id", b"apim-request-id"):
        headers = client_response_headers([(name, b"up-1"), (b"content-type", b"x")], b"rid")
        assert headers == [
            (b"content-type", b"x"),
            (b"x-upstream-request-id", b"up-1"),
            (b"x-request-id", b"rid"),
        ]
    both = [(b"apim-request-id", b"apim"), (b"X-Request-Id", b"openai")]
    assert (b"x-upstream-request-id", b"openai") in client_response_headers(both, b"rid")


def test_forwarding_never_sends_credentials_whatever_the_rules() -> None:
    sent = upstream_request_headers(
        [(b"authorization", b"Bearer c"), (b"cookie", b"a"), (b"te", b"trailers"),
         (b"host", b"proxy"), (b"x-a", b"1"), (b"baggage", b"k=v")],
        b"rid",
    )  # fmt: skip
    # Rules the config would refuse, built by hand: they still cannot send these.
    forwarding = Forwarding(["*", "authorization", "cookie"], [("x-a", "static")])
    assert forwarding.request_headers(sent) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"rid"),
        (b"baggage", b"k=v"),
        (b"x-a", b"static"),
    ]


def test_error_answers_lose_the_secret_header_values_but_not_the_literal_ones() -> None:
    upstream = Upstream(
        "azure",
        "https://a.example",
        headers=(("api-key", Secret(AZURE_KEY)), ("x-title", "My App")),
    )
    body = f'{{"error": "bad key {AZURE_KEY} for My App"}}'.encode()
    scrubbed, _ = scrub_key(upstream, body, [])
    assert scrubbed == b'{"error": "bad key *** for My App"}'
