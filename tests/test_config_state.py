"""proxy.config, the fleet sections: `state:` (where limits and budgets are kept) and each
key's `budget:`; every mistake named by file, line and path, the URL never quoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import (
    Budget,
    ConfigError,
    ConfigIssue,
    Secret,
    StateSettings,
    load_config,
    parse_config,
)

PASSWORD = "hunter2-redis-pass"  # searched for in every message
URL = f"redis://:{PASSWORD}@127.0.0.1:6379/0"
SHA = "a" * 64

# Lines: 6 state, 7 url, 8 on_unavailable, 9 timeout, 10 keys, 12 sha256, 13 budget.
BASE = f"""\
upstreams:
  mock: {{base_url: http://127.0.0.1:9/v1}}
routes:
  - model: support-bot
    targets: [{{upstream: mock, model: mock-chat}}]
state:
  url: ${{REDIS_URL}}
  on_unavailable: open
  timeout: 0.05
keys:
  team-a:
    sha256: '{SHA}'
    budget: {{usd: 50.00, period: day}}
"""


def _edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def _issues(text: str, url: str = URL) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml", {"REDIS_URL": url})
    assert PASSWORD not in str(info.value)
    assert url not in str(info.value)
    return info.value.issues


def test_state_and_budget_parse_into_frozen_settings() -> None:
    config = parse_config(BASE, "routes.yaml", {"REDIS_URL": URL})
    assert config.state == StateSettings(Secret(URL), "sluicegate:", "open", 0.05)
    assert config.state.url is not None
    assert config.state.url.reveal() == URL
    assert config.keys[0].budget == Budget(50.0, "day")
    assert config.keys[0].limited
    assert PASSWORD not in repr(config)


def test_without_state_the_store_is_in_process_as_before() -> None:
    text = BASE.split("state:", maxsplit=1)[0]
    config = parse_config(text, "routes.yaml", {})
    assert config.state == StateSettings()
    assert config.state.url is None


def test_an_empty_expansion_means_no_shared_state() -> None:
    config = parse_config(_edit("${REDIS_URL}", "${REDIS_URL:-}"), "routes.yaml", {})
    assert config.state.url is None


def test_key_prefix_and_closed_mode_are_read() -> None:
    text = _edit("on_unavailable: open", "on_unavailable: closed\n  key_prefix: 'prod:'")
    config = parse_config(text, "routes.yaml", {"REDIS_URL": "rediss://h.example:6380"})
    assert config.state.on_unavailable == "closed"
    assert config.state.key_prefix == "prod:"


BROKEN = [
    pytest.param(BASE, "http://u:p@h:6379", 7, "state.url", "redis:// or rediss://", id="scheme"),
    pytest.param(BASE, "redis://:x@h:99999", 7, "state.url", "valid port", id="port"),
    pytest.param(BASE, "redis://h:6379/zero", 7, "state.url", "database number", id="db"),
    pytest.param(
        _edit("${REDIS_URL}", f"'{URL}'"), URL, 7, "state.url", "expected a ${VAR}", id="literal"
    ),
    pytest.param(
        _edit("on_unavailable: open", "on_unavailable: ajar"),
        URL,
        8,
        "state.on_unavailable",
        "expected one of open, closed, got 'ajar'",
        id="mode",
    ),
    pytest.param(
        _edit("on_unavailable", "on_unavailible"),
        URL,
        8,
        "state.on_unavailible",
        "did you mean 'on_unavailable'?",
        id="misspelt-key",
    ),
    pytest.param(
        _edit("timeout: 0.05", "timeout: 0"), URL, 9, "state.timeout", "greater than 0", id="t"
    ),
    pytest.param(
        _edit("usd: 50.00", "usd: -5"),
        URL,
        13,
        "keys.team-a.budget.usd",
        "must be 0 or more, got number -5",
        id="negative-budget",
    ),
    pytest.param(
        _edit("period: day", "period: week"),
        URL,
        13,
        "keys.team-a.budget.period",
        "expected one of day, month, total, got 'week'",
        id="period",
    ),
    pytest.param(
        _edit(", period: day", ""),
        URL,
        13,
        "keys.team-a.budget",
        "missing required key 'period'",
        id="no-period",
    ),
    pytest.param(
        _edit("period: day", "period: day, usd_per: 1"),
        URL,
        13,
        "keys.team-a.budget.usd_per",
        "did you mean 'usd'?",
        id="unknown-budget-key",
    ),
]


@pytest.mark.parametrize(("text", "url", "line", "path", "fragment"), BROKEN)
def test_a_broken_state_or_budget_names_line_and_path(
    text: str, url: str, line: int, path: str, fragment: str
) -> None:
    issues = [i for i in _issues(text, url) if i.path == path]
    assert len(issues) == 1, _issues(text, url)
    assert fragment in issues[0].message
    assert issues[0].line == line
    assert issues[0].file == "routes.yaml"


def test_a_bad_url_is_shown_by_its_reference_only() -> None:
    (issue,) = _issues(BASE, f"http://:{PASSWORD}@h:6379")
    assert issue.message.endswith("got from '${REDIS_URL}'")


def test_load_config_reads_state_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BASE)
    config = load_config(path, {"REDIS_URL": URL})
    assert config.state.url == Secret(URL)
