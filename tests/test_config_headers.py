"""proxy.config.headers: `forward_headers:`, `headers:` and `query:` on an upstream, and the
rules and headers the config refuses (file, line, path, what was expected; never a value)."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, Secret, Upstream, parse_config

AZURE_KEY = "azk-5b1e9c0d7a2f4e6b8c3d"

# Line 3 is the upstream's first extra key.
ROUTES = """\
upstreams:
  up:
    base_url: https://up.example/v1
{extra}
routes:
  - {{model: m, targets: [{{upstream: up, model: m}}]}}
"""


def _parse(extra: str, env: dict[str, str] | None = None) -> Upstream:
    return parse_config(ROUTES.format(extra=extra), "routes.yaml", env or {}).upstreams["up"]


def _refused(extra: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(extra, env)
    text = str(info.value)
    for value in (env or {}).values():
        assert value not in text
    return text.splitlines()


def test_headers_forward_rules_and_query_parse() -> None:
    up = _parse(
        "    forward_headers: [X-Team-*, OpenAI-Organization]\n"
        "    headers: {HTTP-Referer: 'https://app.example', api-key: '${AZURE_KEY}'}\n"
        "    query: {api-version: 2024-10-21, n: 1}",
        {"AZURE_KEY": AZURE_KEY},
    )
    assert up.forward_headers == ("x-team-*", "openai-organization")
    # A literal value is the file's own; one from the environment is a secret.
    assert up.headers == (("http-referer", "https://app.example"), ("api-key", Secret(AZURE_KEY)))
    assert AZURE_KEY not in repr(up)
    assert up.query == (("api-version", "2024-10-21"), ("n", "1"))  # an unquoted date too


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        ("authorization", "authorization"),
        ("Cookie", "cookie"),
        ("author*", "authorization"),
        ("*", "proxy-authorization"),
        ("*-length", "content-length"),
        ("transfer-encoding", "transfer-encoding"),
        ("connection", "connection"),
        ("x-*", "x-request-id"),
        ("host", "host"),
    ],
)
def test_a_rule_that_would_forward_credentials_or_hop_by_hop_headers_is_refused(
    rule: str, named: str
) -> None:
    (line,) = _refused(f"    forward_headers: ['{rule}']")
    assert line.startswith("routes.yaml:4: upstreams.up.forward_headers[0]: would forward ")
    assert named in line
    assert "never go upstream" in line


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Host", "host is set by the proxy or the connection"),
        ("content-length", "content-length is set by the proxy"),
        ("Transfer-Encoding", "transfer-encoding is set by the proxy"),
        ("connection", "connection is set by the proxy"),
        ("proxy-authorization", "proxy-authorization is set by the proxy"),
        ("bad header", "expected an HTTP header name"),
    ],
)
def test_static_headers_that_are_not_the_configs_to_set_are_refused(
    header: str, message: str
) -> None:
    (line,) = _refused(f"    headers: {{'{header}': '${{AZURE_KEY}}'}}", {"AZURE_KEY": AZURE_KEY})
    assert line.startswith(f"routes.yaml:4: upstreams.up.headers.{header}: {message}")


def test_authorization_is_a_static_header_only_without_api_key() -> None:
    custom = _parse("    headers: {Authorization: 'Token ${T}'}", {"T": AZURE_KEY})
    assert custom.api_key is None
    assert custom.headers == (("authorization", Secret(f"Token {AZURE_KEY}")),)
    (line,) = _refused(
        "    api_key: ${T}\n    headers: {authorization: 'Token ${T}'}", {"T": AZURE_KEY}
    )
    assert "upstreams.up.headers.authorization: api_key is sent as Authorization" in line


def test_a_header_value_with_a_line_break_is_refused_without_echoing_it() -> None:
    (line,) = _refused("    headers: {api-key: '${K}'}", {"K": AZURE_KEY + "\n"})
    assert line == (
        "routes.yaml:4: upstreams.up.headers.api-key: "
        "expected a string without line breaks or control characters"
    )
    (twice,) = _refused("    headers: {X-A: '1', x-a: '2'}")
    assert "x-a is given twice" in twice


def test_a_query_in_base_url_points_at_query() -> None:
    (line,) = _refused("    query: {}\n  other: {base_url: 'https://x.example/v1?api-version=1'}")
    assert line.endswith("(parameters go in `query:`), got 'https://x.example/v1?api-version=1'")
