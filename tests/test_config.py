"""proxy.config: routes.yaml → frozen Config, and every mistake reported with line and path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from proxy.config import (
    MAX_YAML_VALUES,
    Config,
    ConfigError,
    ConfigIssue,
    Price,
    Route,
    Secret,
    ServerSettings,
    Target,
    Timeouts,
    Upstream,
    UsageHeaders,
    load_config,
    parse_config,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
KEY = "sk-deepseek-0123456789abcdef"

EXAMPLE = """\
server: {max_body_bytes: 4194304}
upstreams:
  deepseek:
    base_url: https://api.deepseek.com/v1
    api_key: ${DEEPSEEK_API_KEY}        # ${VAR} expands from the environment
    stream_options: auto                # auto | pass | strip
    usage_headers: {prompt_tokens: X-Prompt-Tokens, completion_tokens: x-completion-tokens}
    timeouts: {connect: 5, read: 30}
    max_connections: 1000
  gemini:
    base_url: https://generativelanguage.googleapis.com/v1beta/openai/
    stream_options: strip
routes:
  - model: support-bot
    targets: [{upstream: deepseek, model: deepseek-chat, weight: 1}]
    fallbacks: [{upstream: gemini, model: gemini-2.0-flash}]
    first_token_timeout: 2.0
pricing:
  deepseek-chat: {input: 0.28, cached_input: 0.028, output: 0.42}
"""

# Lines: 1 upstreams, 3 deepseek.base_url, 5 gemini.base_url, 7 routes[0], 8 targets, 9 fallbacks.
BASE = """\
upstreams:
  deepseek:
    base_url: https://api.deepseek.com/v1
  gemini:
    base_url: https://gemini.example/v1
routes:
  - model: support-bot
    targets: [{upstream: deepseek, model: deepseek-chat}]
    fallbacks: [{upstream: gemini, model: gemini-2.0-flash}]
"""

# Every broken case runs with this environment; no message may ever contain its value.
ENV = {"UNRELATED_SECRET": "hunter2-do-not-print"}


def _edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def _issues(text: str, env: dict[str, str] | None = None) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml", ENV if env is None else env)
    for value in (env or ENV).values():
        assert value not in str(info.value)
    return info.value.issues


def _one(issues: tuple[ConfigIssue, ...], path: str) -> ConfigIssue:
    found = [i for i in issues if i.path == path]
    assert len(found) == 1, "\n".join(map(str, issues))
    return found[0]


def test_the_example_parses_into_the_expected_dataclasses() -> None:
    config = parse_config(EXAMPLE, "routes.yaml", {"DEEPSEEK_API_KEY": KEY})

    assert config.server == ServerSettings(max_body_bytes=4194304)
    assert list(config.upstreams) == ["deepseek", "gemini"]
    assert config.upstreams["deepseek"] == Upstream(
        name="deepseek",
        base_url="https://api.deepseek.com/v1",
        api_key=Secret(KEY),
        stream_options="auto",
        usage_headers=UsageHeaders("x-prompt-tokens", "x-completion-tokens"),
        timeouts=Timeouts(connect=5.0, read=30.0),
        max_connections=1000,
    )
    assert config.upstreams["gemini"] == Upstream(
        name="gemini",
        base_url="https://generativelanguage.googleapis.com/v1beta/openai",
        stream_options="strip",
    )
    assert config.routes == (
        Route(
            model="support-bot",
            targets=(Target("deepseek", "deepseek-chat", 1.0),),
            fallbacks=(Target("gemini", "gemini-2.0-flash"),),
            first_token_timeout=2.0,
        ),
    )
    assert config.pricing == {"deepseek-chat": Price(input=0.28, output=0.42, cached_input=0.028)}
    assert config.source == "routes.yaml"
    key = config.upstreams["deepseek"].api_key
    assert key is not None
    assert key.reveal() == KEY
    assert isinstance(config.upstreams["deepseek"].timeouts.read, float)


def test_the_byte_limits_on_upstream_answers_parse_with_their_defaults() -> None:
    edited = _edit("/v1\n  gemini", "/v1\n    max_response_bytes: 1048576\n  gemini")
    config = parse_config("server: {max_event_bytes: 65536}\n" + edited, "r.yaml", {})
    assert config.server.max_event_bytes == 65536
    assert config.upstreams["deepseek"].max_response_bytes == 1048576
    assert config.upstreams["gemini"].max_response_bytes == 64 * 1024 * 1024
    assert parse_config(BASE, "r.yaml", {}).server.max_event_bytes == 4 * 1024 * 1024


def test_the_api_key_never_shows() -> None:
    config = parse_config(EXAMPLE, "routes.yaml", {"DEEPSEEK_API_KEY": KEY})
    secret = Secret(KEY)
    for text in (repr(config), str(config), repr(secret), str(secret), f"{secret}"):
        assert KEY not in text
    assert repr(secret) == str(secret) == "Secret('***')"
    assert "Secret('***')" in repr(config)
    assert secret == Secret(KEY)
    assert secret != Secret("other")
    assert secret != KEY
    assert len({secret, Secret(KEY)}) == 1


def test_the_config_is_frozen_and_read_only() -> None:
    config = parse_config(EXAMPLE, "routes.yaml", {"DEEPSEEK_API_KEY": KEY})
    with pytest.raises(TypeError):
        config.upstreams["x"] = config.upstreams["deepseek"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.pricing["x"] = Price(1, 1, 1)  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.source = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.upstreams["deepseek"].base_url = "http://evil"  # type: ignore[misc]


def test_defaults_fill_in_whatever_is_left_out() -> None:
    config = parse_config(BASE, "routes.yaml", {})
    deepseek = config.upstreams["deepseek"]
    assert deepseek.api_key is None
    assert deepseek.stream_options == "auto"
    assert deepseek.usage_headers == UsageHeaders(None, None)
    assert deepseek.timeouts == Timeouts(5.0, 30.0)
    assert deepseek.max_connections == 1000
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    assert config.routes[0].targets[0].weight == 1.0
    assert config.routes[0].first_token_timeout is None
    assert config.pricing == {}


def test_cached_input_defaults_to_input_and_zero_is_a_price() -> None:
    text = (
        BASE
        + "pricing:\n  a: {input: 1.5, output: 2}\n  b: {input: 1, output: 0, cached_input: 0}\n"
    )
    pricing = parse_config(text, "routes.yaml", {}).pricing
    assert pricing["a"] == Price(input=1.5, output=2.0, cached_input=1.5)
    assert pricing["b"] == Price(input=1.0, output=0.0, cached_input=0.0)


def test_empty_optional_sections_read_as_absent() -> None:
    text = "server:\n" + BASE + "pricing:\n"
    config = parse_config(text, "routes.yaml", {})
    assert config.server == ServerSettings()
    assert config.pricing == {}


BROKEN = [
    pytest.param(
        _edit(
            "    base_url: https://api.deepseek.com/v1", "    base_ur: https://api.deepseek.com/v1"
        ),
        3,
        "upstreams.deepseek.base_ur",
        "unknown key 'base_ur' (did you mean 'base_url'?)",
        id="unknown-key-with-suggestion",
    ),
    pytest.param(
        _edit("  gemini:\n", "  gemini:\n    retries: 3\n"),
        5,
        "upstreams.gemini.retries",
        "unknown key 'retries' (allowed: base_url, api_key, stream_options,",
        id="unknown-key-lists-the-allowed-ones",
    ),
    pytest.param(
        _edit("    base_url: https://gemini.example/v1", "    api_key: sk-1"),
        4,
        "upstreams.gemini",
        "missing required key 'base_url'",
        id="missing-base-url",
    ),
    pytest.param(
        _edit("routes:", "routes:\n  - model: no-targets"),
        7,
        "routes[0]",
        "missing required key 'targets'",
        id="missing-targets",
    ),
    pytest.param(
        _edit("routes:\n", "routez:\n"),
        6,
        "routez",
        "unknown key 'routez' (did you mean 'routes'?)",
        id="top-level-typo",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    timeouts: {connect: 5, read: fast}\n  gemini"),
        4,
        "upstreams.deepseek.timeouts.read",
        "expected a number, got string 'fast'",
        id="string-for-a-number",
    ),
    pytest.param(
        _edit("model: deepseek-chat}", "model: deepseek-chat, weight: true}"),
        8,
        "routes[0].targets[0].weight",
        "expected a number, got boolean true",
        id="bool-for-a-number",
    ),
    pytest.param(
        _edit("model: deepseek-chat}", "model: deepseek-chat, weight: -1}"),
        8,
        "routes[0].targets[0].weight",
        "must be greater than 0, got number -1",
        id="negative-weight",
    ),
    pytest.param(
        _edit("  - model: support-bot\n", "  - model: support-bot\n    first_token_timeout: 0\n"),
        8,
        "routes[0].first_token_timeout",
        "must be greater than 0",
        id="zero-first-token-timeout",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    stream_options: sometimes\n  gemini"),
        4,
        "upstreams.deepseek.stream_options",
        "expected one of auto, pass, strip, got 'sometimes'",
        id="bad-stream-options",
    ),
    pytest.param(
        _edit("upstream: deepseek,", "upstream: azure-east,"),
        8,
        "routes[0].targets[0].upstream",
        "unknown upstream 'azure-east' (declared: deepseek, gemini)",
        id="undeclared-upstream-in-targets",
    ),
    pytest.param(
        _edit("upstream: gemini,", "upstream: azure-east,"),
        9,
        "routes[0].fallbacks[0].upstream",
        "unknown upstream 'azure-east' (declared: deepseek, gemini)",
        id="undeclared-upstream-in-fallbacks",
    ),
    pytest.param(
        BASE + "  - model: support-bot\n    targets: [{upstream: gemini, model: g}]\n",
        10,
        "routes[1].model",
        "duplicate route model 'support-bot' (first defined at routes[0])",
        id="duplicate-route-model",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    api_key: ${DEEPSEEK_API_KEY}\n  gemini"),
        4,
        "upstreams.deepseek.api_key",
        "environment variable DEEPSEEK_API_KEY is not set",
        id="missing-env-var",
    ),
    pytest.param(
        _edit("targets: [{upstream: deepseek, model: deepseek-chat}]", "targets: []"),
        8,
        "routes[0].targets",
        "expected a list of at least one target, got an empty list",
        id="empty-targets",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "gemini.example/v1"),
        5,
        "upstreams.gemini.base_url",
        "expected an http:// or https:// URL with a host, got 'gemini.example/v1'",
        id="base-url-without-scheme",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "https:///v1"),
        5,
        "upstreams.gemini.base_url",
        "with a host",
        id="base-url-without-host",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "https://gemini.example/v1?key=abc"),
        5,
        "upstreams.gemini.base_url",
        "expected a URL without a query or fragment",
        id="base-url-with-query",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "'http://[::1/v1'"),
        5,
        "upstreams.gemini.base_url",
        "with a host, got 'http://[::1/v1'",
        id="base-url-unclosed-ipv6",
    ),
    pytest.param(
        _edit("  - model: support-bot", "  - model: ~"),
        7,
        "routes[0].model",
        "expected a value, got null",
        id="null-for-a-required-key",
    ),
    pytest.param(
        _edit("  gemini:", '  "":'),
        4,
        'upstreams.""',
        "expected a non-empty upstream name",
        id="empty-upstream-name",
    ),
    pytest.param(
        _edit("  gemini:", "  gem\x01ini:"),
        4,
        "",
        "invalid YAML: special characters are not allowed",
        id="control-character",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "https://x: y"),
        5,
        "",
        "invalid YAML: mapping values are not allowed here",
        id="yaml-syntax-error",
    ),
    pytest.param(
        "- upstreams\n- routes\n",
        1,
        "",
        "expected a mapping, got a list",
        id="non-mapping-document",
    ),
    pytest.param("", None, "", "the file is empty", id="empty-file"),
    pytest.param(
        _edit("  gemini:", "  5:"),
        4,
        "upstreams.5",
        "expected a string key, got number 5",
        id="int-key",
    ),
    pytest.param(
        "server: {max_body_bytes: 1048576.0}\n" + BASE,
        1,
        "server.max_body_bytes",
        "expected an integer, got number 1048576.0",
        id="max-body-bytes-float",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    max_connections: 0\n  gemini"),
        4,
        "upstreams.deepseek.max_connections",
        "must be 1 or more, got number 0",
        id="zero-max-connections",
    ),
    pytest.param(
        "server: {max_event_bytes: 0}\n" + BASE,
        1,
        "server.max_event_bytes",
        "must be 1 or more, got number 0",
        id="zero-max-event-bytes",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    max_response_bytes: 1.5\n  gemini"),
        4,
        "upstreams.deepseek.max_response_bytes",
        "expected an integer, got number 1.5",
        id="float-max-response-bytes",
    ),
    pytest.param(
        BASE + "pricing:\n  deepseek-chat: {input: -0.28, output: 0.42}\n",
        11,
        "pricing.deepseek-chat.input",
        "must be 0 or more, got number -0.28",
        id="negative-price",
    ),
    pytest.param(
        BASE + "pricing:\n  deepseek-chat: {input: 0.28}\n",
        11,
        "pricing.deepseek-chat",
        "missing required key 'output'",
        id="price-without-output",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    usage_headers: {prompt_tokens: 'x prompt'}\n  gemini"),
        4,
        "upstreams.deepseek.usage_headers.prompt_tokens",
        "expected an HTTP header name, got 'x prompt'",
        id="bad-usage-header-name",
    ),
    pytest.param(
        _edit("/v1\n  gemini", "/v1\n    timeouts: 30\n  gemini"),
        4,
        "upstreams.deepseek.timeouts",
        "expected a mapping, got number 30",
        id="scalar-for-a-mapping",
    ),
    pytest.param(
        _edit("  - model: support-bot", "  - model: ''"),
        7,
        "routes[0].model",
        "expected a non-empty string",
        id="empty-route-model",
    ),
    pytest.param(
        _edit("upstreams:\n", "upstreams:\n  deepseek:\n    base_url: https://dup.example\n"),
        4,
        "upstreams.deepseek",
        "duplicate key 'deepseek' (first at line 2)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "!!int abc"),
        5,
        "upstreams.gemini.base_url",
        "'abc' is not a valid !!int",
        id="bad-value-for-a-standard-tag",
    ),
    pytest.param(
        _edit("  gemini:\n", "  ? [a, b]\n  : {base_url: http://x}\n  gemini:\n"),
        4,
        "upstreams",
        "expected a string key, got a collection",
        id="collection-key",
    ),
    pytest.param(
        _edit("https://gemini.example/v1", "!env GEMINI_URL"),
        5,
        "upstreams.gemini.base_url",
        "unsupported YAML tag '!env'",
        id="custom-yaml-tag",
    ),
]


@pytest.mark.parametrize(("text", "line", "path", "fragment"), BROKEN)
def test_a_broken_config_names_line_path_and_expectation(
    text: str, line: int | None, path: str, fragment: str
) -> None:
    issue = _one(_issues(text), path)
    assert fragment in issue.message
    assert issue.line == line
    assert issue.file == "routes.yaml"


def test_every_error_in_a_file_is_reported_in_line_order() -> None:
    text = """\
upstreams:
  deepseek:
    base_ur: https://api.deepseek.com/v1
    timeouts: {read: fast}
routes:
  - model: a
    targets: [{upstream: nowhere, model: m, weight: 0}]
  - model: a
    targets: []
"""
    issues = _issues(text)
    assert [(i.line, i.path) for i in issues] == [
        (2, "upstreams.deepseek"),
        (3, "upstreams.deepseek.base_ur"),
        (4, "upstreams.deepseek.timeouts.read"),
        (7, "routes[0].targets[0].upstream"),
        (7, "routes[0].targets[0].weight"),
        (8, "routes[1].model"),
        (9, "routes[1].targets"),
    ]


def test_a_syntax_error_is_the_only_issue_and_points_at_the_line() -> None:
    text = "upstreams:\n  a:\n    base_url: http://x\n   bad indent: 1\n"
    (issue,) = _issues(text)
    assert issue.line == 4
    assert issue.path == ""
    assert issue.message.startswith("invalid YAML: ")
    assert str(issue).startswith("routes.yaml:4: invalid YAML: ")


def test_an_unquoted_reference_in_flow_style_gets_a_hint() -> None:
    (issue,) = _issues(_edit("model: deepseek-chat}", "model: ${MODEL}}"))
    assert issue.line == 8
    assert issue.message.endswith("inside [ ] or { } a ${...} must be quoted")


def test_missing_top_level_sections() -> None:
    issues = _issues("server: {max_body_bytes: 10}\n")
    assert [(i.line, i.path, i.message) for i in issues] == [
        (1, "", "missing required key 'upstreams'"),
        (1, "", "missing required key 'routes'"),
    ]


def test_empty_upstreams_and_routes() -> None:
    issues = _issues("upstreams: {}\nroutes: []\n")
    assert [(i.line, i.path) for i in issues] == [(1, "upstreams"), (2, "routes")]
    assert "at least one upstream" in issues[0].message
    assert "at least one route" in issues[1].message


def test_env_default_applies_when_unset_or_empty() -> None:
    text = _edit("/v1\n  gemini", "/v1\n    api_key: ${DEEPSEEK_API_KEY:-sk-default}\n  gemini")
    for env, expected in (({}, "sk-default"), ({"DEEPSEEK_API_KEY": ""}, "sk-default")):
        key = parse_config(text, "routes.yaml", env).upstreams["deepseek"].api_key
        assert key == Secret(expected)
    key = parse_config(text, "routes.yaml", {"DEEPSEEK_API_KEY": KEY}).upstreams["deepseek"].api_key
    assert key == Secret(KEY)


def test_an_empty_default_means_no_api_key() -> None:
    text = _edit("/v1\n  gemini", "/v1\n    api_key: ${LOCAL_KEY:-}\n  gemini")
    assert parse_config(text, "routes.yaml", {}).upstreams["deepseek"].api_key is None


def test_env_expands_inside_strings_and_into_number_fields() -> None:
    text = _edit(
        "    base_url: https://api.deepseek.com/v1",
        "    base_url: http://${HOST}:${PORT:-8000}/v1\n"
        "    timeouts: {read: '${READ_TIMEOUT:-45}'}\n"
        "    max_connections: '${POOL}'",
    )
    config = parse_config(text, "routes.yaml", {"HOST": "vllm.internal", "POOL": "64"})
    deepseek = config.upstreams["deepseek"]
    assert deepseek.base_url == "http://vllm.internal:8000/v1"
    assert deepseek.timeouts.read == 45.0
    assert deepseek.max_connections == 64


def test_dollar_dollar_brace_is_a_literal_and_keys_never_expand() -> None:
    text = _edit("  - model: support-bot", "  - model: price-$${X}") + (
        "pricing:\n  ${X}: {input: 1, output: 1}\n"
    )
    config = parse_config(text, "routes.yaml", {"X": "expanded"})
    assert config.route("price-${X}") is not None
    assert list(config.pricing) == ["${X}"]


def test_expanded_values_never_appear_in_messages() -> None:
    env = {"MODE": "s3cret-mode", "PRIMARY": "s3cret-upstream", "POOL": "s3cret-pool"}
    text = _edit(
        "/v1\n  gemini",
        "/v1\n    stream_options: ${MODE}\n    max_connections: ${POOL}\n  gemini",
    ).replace("upstream: deepseek,", "upstream: '${PRIMARY}',")
    issues = _issues(text, env)
    assert _one(issues, "upstreams.deepseek.stream_options").message == (
        "expected one of auto, pass, strip, got from '${MODE}'"
    )
    assert "'${POOL}'" in _one(issues, "upstreams.deepseek.max_connections").message
    assert "'${PRIMARY}'" in _one(issues, "routes[0].targets[0].upstream").message


def test_a_literal_api_key_of_the_wrong_type_is_not_echoed() -> None:
    text = _edit("/v1\n  gemini", "/v1\n    api_key: 123456789\n  gemini")
    issue = _one(_issues(text), "upstreams.deepseek.api_key")
    assert "123456789" not in issue.message


def test_malformed_env_references() -> None:
    text = _edit(
        "/v1\n  gemini", "/v1\n    api_key: ${not-a-name}\n    stream_options: ${MODE\n  gemini"
    )
    issues = _issues(text)
    assert "invalid reference '${not-a-name}'" in _one(issues, "upstreams.deepseek.api_key").message
    assert "invalid reference '${MODE'" in _one(issues, "upstreams.deepseek.stream_options").message


def test_yaml_merge_keys_and_recursive_aliases_are_reported() -> None:
    text = _edit("  gemini:\n", "  gemini:\n    <<: {timeouts: {read: 5}}\n")
    assert "merge keys" in _one(_issues(text), "upstreams.gemini.<<").message
    assert "recursive" in _one(_issues("a: &x [*x]\n"), "a[0]").message


def test_aliases_are_followed() -> None:
    text = _edit(
        "/v1\n  gemini:\n", "/v1\n    timeouts: &t {read: 90}\n  gemini:\n    timeouts: *t\n"
    )
    config = parse_config(text, "routes.yaml", {})
    assert config.upstreams["gemini"].timeouts == Timeouts(read=90.0)


def test_alias_expansion_is_bounded_and_refused_at_the_entry_using_it() -> None:
    # Each level multiplies by nine: 9 ** 5 = 59049 values in a4, some 66000 in all.
    levels = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 5)]
    small = "\n".join(levels) + "\n"
    assert "aliases" not in str(_issues(BASE + small))  # within the budget: only unknown keys
    (issue,) = _issues(BASE + small + "big: [*a4, *a4]\n")
    assert issue.line == 15
    assert issue.path.startswith("big[")
    assert issue.message == f"invalid YAML: aliases expand to more than {MAX_YAML_VALUES} values"


def test_route_lookup_and_summary() -> None:
    config = parse_config(EXAMPLE, "routes.yaml", {"DEEPSEEK_API_KEY": KEY})
    route = config.route("support-bot")
    assert route is not None
    assert route.targets[0].upstream == "deepseek"
    assert config.route("deepseek-chat") is None
    assert config.summary() == "routes.yaml: 2 upstreams, 1 route, 1 priced model, open"

    two = parse_config(
        BASE + "  - model: b\n    targets: [{upstream: gemini, model: g}]\n", "r", {}
    )
    assert two.route("b") is two.routes[1]
    assert two.summary() == "r: 2 upstreams, 2 routes, 0 priced models, open"


def test_a_hand_built_config_is_indexed_and_read_only_too() -> None:
    up = Upstream("a", "http://a")
    route = Route("m", (Target("a", "x"),))
    config = Config(ServerSettings(), {"a": up}, (route,), {}, "inline")
    assert config.route("m") is route
    with pytest.raises(TypeError):
        config.upstreams["b"] = up  # type: ignore[index]


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (
            ConfigIssue("routes.yaml", 12, "routes[2].fallbacks[0].upstream", "unknown upstream"),
            "routes.yaml:12: routes[2].fallbacks[0].upstream: unknown upstream",
        ),
        (ConfigIssue("routes.yaml", None, "a.b", "msg"), "routes.yaml: a.b: msg"),
        (ConfigIssue("routes.yaml", 3, "", "msg"), "routes.yaml:3: msg"),
        (ConfigIssue("routes.yaml", None, "", "msg"), "routes.yaml: msg"),
    ],
    ids=["line-and-path", "no-line", "root", "neither"],
)
def test_issue_format(issue: ConfigIssue, text: str) -> None:
    assert str(issue) == text


def test_config_error_joins_its_issues_and_survives_pickling() -> None:
    issues = [ConfigIssue("r.yaml", 1, "a", "x"), ConfigIssue("r.yaml", 2, "b", "y")]
    err = ConfigError(issues)
    assert str(err) == "r.yaml:1: a: x\nr.yaml:2: b: y"
    assert err.issues == tuple(issues)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.issues == err.issues
    assert str(copy) == str(err)


def test_load_config_reads_the_file_and_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    config = load_config(path)
    assert config.source == str(path)
    assert config.upstreams["deepseek"].api_key == Secret(KEY)
    assert load_config(str(path), {"DEEPSEEK_API_KEY": "other"}).upstreams[
        "deepseek"
    ].api_key == Secret("other")


def test_load_config_skips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_config(path, {}).route("support-bot") is not None


def test_load_config_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.path) == (str(path), None, "")
    assert "No such file or directory" in issue.message
    assert str(info.value).startswith(f"{path}: cannot read")


def test_load_config_on_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "not UTF-8" in info.value.issues[0].message


FIXTURES = {
    "broken_unknown_upstream.yaml": [
        (10, "routes[0].targets[0].upstream", "unknown upstream 'azure-east'"),
        (13, "routes[0].fallbacks[1].upstream", "unknown upstream 'deepseek-v2'"),
    ],
    "broken_types.yaml": [
        (3, "server.max_body_bytes", "expected an integer, got number 4194304.0"),
        (5, "upstreams.deepseek", "missing required key 'base_url'"),
        (6, "upstreams.deepseek.base_ur", "did you mean 'base_url'?"),
        (7, "upstreams.deepseek.stream_options", "got 'sometimes'"),
        (8, "upstreams.deepseek.timeouts.connect", "expected a number, got string 'fast'"),
        (8, "upstreams.deepseek.timeouts.read", "must be greater than 0"),
        (9, "upstreams.deepseek.max_connections", "expected an integer, got boolean true"),
        (12, "routes[0].targets[0].weight", "must be greater than 0"),
        (13, "routes[0].first_token_timeout", "expected a number, got string '2s'"),
        (14, "routes[1].model", "duplicate route model 'support-bot'"),
        (15, "routes[1].targets", "at least one target"),
        (17, "pricing.deepseek-chat.output", "must be 0 or more"),
    ],
    "broken_syntax.yaml": [(7, "", "invalid YAML: expected ',' or '}', but got ']'")],
    "broken_missing_env.yaml": [
        (5, "upstreams.deepseek.api_key", "SLUICEGATE_TEST_NEVER_SET is not set"),
    ],
    "broken_latency.yaml": [
        (7, "routes[0].strategy", "expected one of weighted, least_inflight, fastest"),
        (8, "routes[0].hedge_after", "expected seconds or auto, got string 'whenever'"),
        (9, "routes[0].outliers.factor", "must be more than 1, got number 0.5"),
        (9, "routes[0].outliers.min_samples", "must be 1 or more, got number 0"),
    ],
}


def test_every_broken_fixture_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("broken_*.yaml")) == sorted(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_broken_fixture_files(name: str) -> None:
    path = CONFIGS / name
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    issues = info.value.issues
    got = [(i.line, i.path) for i in issues]
    assert got == [(line, p) for line, p, _ in FIXTURES[name]], str(info.value)
    for issue, (_, _, fragment) in zip(issues, FIXTURES[name], strict=True):
        assert fragment in issue.message
        assert str(issue).startswith(f"{path}:{issue.line}: ")  # what `sluicegate check` prints


@pytest.mark.parametrize(
    "key",
    ["sk-a\nb", "sk-ab\n\n", "sk-a\x07b", "sk-a b", "sk-ab\t", "sk-\u00e9b", "\n"],
    ids=["newline-inside", "two-newlines", "bell", "space", "tab", "non-ascii", "only-newline"],
)
def test_an_api_key_that_no_header_can_carry_is_refused_without_echoing(key: str) -> None:
    text = _edit("/v1\n  gemini", "/v1\n    api_key: ${KEY}\n  gemini")
    issue = _one(_issues(text, {"KEY": key}), "upstreams.deepseek.api_key")
    assert issue.line == 4
    assert "expected printable ASCII without spaces, line breaks or controls" in issue.message


@pytest.mark.parametrize("ending", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_one_trailing_newline_is_trimmed_from_an_api_key_with_a_warning(ending: str) -> None:
    text = _edit("/v1\n  gemini", "/v1\n    api_key: ${KEY}\n  gemini")
    config = parse_config(text, "routes.yaml", {"KEY": KEY + ending})
    assert config.upstreams["deepseek"].api_key == Secret(KEY)
    (warning,) = config.warnings
    assert str(warning) == (
        "routes.yaml:4: upstreams.deepseek.api_key: a trailing newline was trimmed from the key"
    )
    assert parse_config(BASE, "routes.yaml", {}).warnings == ()


def test_credentials_in_base_url_and_an_api_key_are_refused_together() -> None:
    url = "https://user:hunter2@api.deepseek.com/v1"
    both = _edit("https://api.deepseek.com/v1", f"{url}\n    api_key: {KEY}")
    issue = _one(_issues(both), "upstreams.deepseek.api_key")
    assert issue.message == "base_url carries credentials (user:pass@) too: keep one of them"
    assert "hunter2" not in str(issue)
    assert KEY not in str(issue)
    alone = parse_config(_edit("https://api.deepseek.com/v1", url), "routes.yaml", {})
    assert alone.upstreams["deepseek"].base_url == url  # one way to authenticate is fine


@pytest.mark.parametrize(
    "url",
    ["ftp://user:hunter2@h/v1", "http://user:hunter2@h:99999/v1", "http://user:hunter2@/v1?x=1"],
    ids=["scheme", "port", "no-host"],
)
def test_an_invalid_base_url_never_shows_its_password(url: str) -> None:
    issue = _one(_issues(_edit("https://api.deepseek.com/v1", url)), "upstreams.deepseek.base_url")
    assert "hunter2" not in issue.message
    assert "user:***@" in issue.message


def test_max_echoed_chars_defaults_to_200_and_must_be_a_count() -> None:
    assert parse_config(BASE, "routes.yaml", {}).server.max_echoed_chars == 200
    issue = _one(_issues("server: {max_echoed_chars: 0}\n" + BASE), "server.max_echoed_chars")
    assert (issue.line, issue.message) == (1, "must be 1 or more, got number 0")


def test_cors_origins_and_allowed_hosts_are_read_lower_case() -> None:
    server = "server:\n  cors_origins: [HTTPS://App.example, 'http://[::1]:8080']\n"
    config = parse_config(server + "  allowed_hosts: [Proxy.example, '[::1]']\n" + BASE, "r", {})
    assert config.server.cors_origins == {"https://app.example", "http://[::1]:8080"}
    assert config.server.allowed_hosts == {"proxy.example", "::1"}
    default = parse_config(BASE, "r", {}).server
    assert (default.cors_origins, default.allowed_hosts) == (frozenset(), None)


@pytest.mark.parametrize(
    ("value", "path", "fragment"),
    [
        ("cors_origins: [https://app.example/]", "server.cors_origins[0]", "scheme://host[:port]"),
        ("cors_origins: ['*']", "server.cors_origins[0]", "scheme://host[:port]"),
        ("cors_origins: [app.example]", "server.cors_origins[0]", "scheme://host[:port]"),
        (
            "cors_origins: [1]",
            "server.cors_origins[0]",
            "expected a non-empty string, got number 1",
        ),
        ("allowed_hosts: ['localhost:8080']", "server.allowed_hosts[0]", "without a port"),
        ("allowed_hosts: ['a b']", "server.allowed_hosts[0]", "without a port"),
        ("allowed_hosts: []", "server.allowed_hosts", "at least one host name"),
        ("allowed_hosts: localhost", "server.allowed_hosts", "expected a list"),
    ],
)
def test_bad_cors_origins_and_allowed_hosts_are_refused(
    value: str, path: str, fragment: str
) -> None:
    issue = _one(_issues(f"server:\n  {value}\n" + BASE), path)
    assert issue.line == 2
    assert fragment in issue.message


# --- what a client connection may take (proxy.connection) -------------------------------------


def test_the_connection_limits_have_defaults_and_can_be_set() -> None:
    assert parse_config(BASE, "routes.yaml", {}).server == ServerSettings(
        max_header_bytes=32768, header_timeout=10.0, max_connections=None
    )
    text = "server: {max_header_bytes: 8192, header_timeout: 2.5, max_connections: 200}\n" + BASE
    server = parse_config(text, "routes.yaml", {}).server
    assert (server.max_header_bytes, server.header_timeout, server.max_connections) == (
        8192,
        2.5,
        200,
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_header_bytes: 1023", "must be 1024 or more, got number 1023"),
        ("max_header_bytes: 0", "must be 1 or more, got number 0"),
        ("max_header_bytes: 4096.5", "expected an integer"),
        ("header_timeout: 0", "must be greater than 0"),
        ("header_timeout: soon", "expected a number, got string 'soon'"),
        ("max_connections: 0", "must be 1 or more, got number 0"),
        ("max_connections: -5", "must be 1 or more, got number -5"),
        ("max_connections: many", "expected an integer, got string 'many'"),
    ],
)
def test_a_bad_connection_limit_is_refused_with_its_path(setting: str, message: str) -> None:
    key = setting.partition(":")[0]
    issue = _one(_issues(f"server: {{{setting}}}\n" + BASE), f"server.{key}")
    assert issue.line == 1
    assert message in issue.message


def test_responses_is_native_unless_set_to_chat() -> None:
    config = parse_config(BASE, "r.yaml", {})
    assert config.upstreams["deepseek"].responses == "native"
    url = "    base_url: https://api.deepseek.com/v1\n"
    edited = _edit(url, url + "    responses: chat\n")
    assert parse_config(edited, "r.yaml", {}).upstreams["deepseek"].responses == "chat"


def test_an_unknown_responses_mode_names_file_line_and_the_choices() -> None:
    url = "    base_url: https://api.deepseek.com/v1\n"
    edited = _edit(url, url + "    responses: translate\n")
    issue = _one(_issues(edited), "upstreams.deepseek.responses")
    assert (issue.file, issue.line) == ("routes.yaml", 4)
    assert issue.message == "expected one of native, chat, got 'translate'"
