"""proxy.config, what a route knows of live latency: `strategy: fastest`, `hedge_after: auto`
and `outliers:`; every mistake named by line and path (as `sluicegate check` prints it)."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, ConfigIssue, Outliers, parse_config

# Lines: 5 the route, 7 strategy, 8 hedge_after, 9 outliers.
BASE = """\
upstreams:
  a: {base_url: http://127.0.0.1:9/v1}
  b: {base_url: http://127.0.0.1:10/v1}
routes:
  - model: bot
    targets: [{upstream: a, model: m}, {upstream: b, model: m}]
    strategy: fastest
    hedge_after: auto
    outliers: {factor: 8, min_samples: 10, seconds: 5}
"""


def _issues(text: str) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml", {})
    return info.value.issues


def test_fastest_auto_hedging_and_outliers_parse() -> None:
    route = parse_config(BASE, "routes.yaml", {}).routes[0]
    assert route.strategy == "fastest"
    assert route.hedge_after == "auto"
    assert route.outliers == Outliers(factor=8.0, min_samples=10, seconds=5.0)


def test_outliers_default_on_for_every_route_and_null_factor_turns_them_off() -> None:
    plain = BASE.replace("    outliers: {factor: 8, min_samples: 10, seconds: 5}\n", "")
    assert parse_config(plain, "routes.yaml", {}).routes[0].outliers == Outliers(5.0, 20, 30.0)
    off = BASE.replace("factor: 8", "factor: null")
    assert parse_config(off, "routes.yaml", {}).routes[0].outliers.factor is None


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        ("strategy: fastest", "strategy: fastes", "routes[0].strategy",
         "expected one of weighted, least_inflight, fastest, got 'fastes'"),
        ("hedge_after: auto", "hedge_after: soon", "routes[0].hedge_after",
         "expected seconds or auto, got string 'soon'"),
        ("factor: 8", "factor: 1", "routes[0].outliers.factor",
         "must be more than 1, got number 1"),
        ("min_samples: 10", "min_samples: 0", "routes[0].outliers.min_samples",
         "must be 1 or more, got number 0"),
        ("seconds: 5", "seconds: 0", "routes[0].outliers.seconds",
         "must be greater than 0, got number 0"),
        ("seconds: 5", "secs: 5", "routes[0].outliers.secs",
         "unknown key 'secs' (did you mean 'seconds'?)"),
    ],
)  # fmt: skip
def test_latency_mistakes_are_named_by_line_and_path(
    old: str, new: str, path: str, message: str
) -> None:
    issues = _issues(BASE.replace(old, new))
    found = [i for i in issues if i.path == path]
    assert len(found) == 1, "\n".join(map(str, issues))
    assert found[0].message == message
    assert found[0].line in (7, 8, 9)
