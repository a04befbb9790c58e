"""Prometheus itself reads what we write: promtool checks and unit-tests the alert rules, and a
real Prometheus scrapes a live target and answers every query of the Grafana dashboard."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.app import create_app
from proxy.config import Secret, parse_config
from proxy.fleet.periods import period_of
from proxy.metering.cost import cost_usd
from proxy.mock.upstream import MockUpstream
from proxy.observe.metrics import Metrics
from proxy.observe.metrics_server import MetricsApp
from proxy.record import Attempt, RequestRecord, Usage
from proxy.serving import RunningServer

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "grafana" / "dashboards" / "sluicegate.json"
START_TIMEOUT = 20.0
METRICS_TOKEN = "prometheus-reads-me-from-a-file-0123"


def require_binary(name: str) -> str:
    """The path of a Prometheus tool. Missing: skipped locally, a failure in CI (where
    scripts/test installs Debian's `prometheus` package)."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{name} is missing in CI: scripts/test installs it as root")
    pytest.skip(f"{name} is not installed (apt-get install prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard's queries against a real Prometheus ----------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", ())
    ]
    for variable in board["templating"]["list"]:
        # Grafana's label_values(metric, label) is not PromQL; this is what it asks for.
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        metric, label = match.groups()
        queries.append((f"variable {variable['name']}", f"group by ({label}) ({metric})"))
    return queries


# What Grafana substitutes before a query leaves it (all routes and upstreams selected).
GRAFANA_VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
    "route": ".*",
    "upstream": ".*",
}


def substitute(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def test_dashboard_shape() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] == 39
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert all(panel["datasource"]["uid"] == "prometheus" for panel in panels)
    assert all(t["datasource"]["uid"] == "prometheus" for p in panels for t in p["targets"])
    assert all("$" not in substitute(expr) for _, expr in dashboard_queries())
    cells = [
        (x, y)
        for g in (panel["gridPos"] for panel in board["panels"])
        for x in range(g["x"], g["x"] + g["w"])
        for y in range(g["y"], g["y"] + g["h"])
    ]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert max(x for x, _ in cells) < 24


def test_every_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    exposition = Metrics(CONFIG).render()[0].decode()
    names = set(re.findall(r"^# TYPE (\w+) ", exposition, re.MULTILINE))
    read = DASHBOARD.read_text() + (RULES / "alerts.yml").read_text()
    assert {name for name in names if name not in read} == set()


@dataclass
class ScrapeTarget:
    """Something Prometheus scrapes, and a way to make it see traffic."""

    address: str  # host:port serving GET /metrics
    drive: Callable[[], None]  # one round of realistic traffic


ROUTES = """\
upstreams:
  deepseek: {base_url: "https://api.deepseek.com/v1"}
  gemini: {base_url: "https://generativelanguage.googleapis.com/v1beta/openai"}
  local: {base_url: "http://127.0.0.1:8900/v1"}
routes:
  - model: support-bot
    targets: [{upstream: deepseek, model: deepseek-chat}]
    fallbacks: [{upstream: gemini, model: gemini-2.0-flash}]
  - model: labs
    targets: [{upstream: local, model: free-model}]
pricing:
  deepseek-chat: {input: 0.28, cached_input: 0.028, output: 0.42}
  gemini-2.0-flash: {input: 0.10, cached_input: 0.025, output: 0.40}
"""
CONFIG = parse_config(ROUTES, "routes.yaml", {})


DS = {"route": "support-bot", "upstream": "deepseek", "model": "deepseek-chat"}
GM = {"route": "support-bot", "upstream": "gemini", "model": "gemini-2.0-flash"}
LABS = {"route": "labs", "upstream": "local", "model": "free-model"}  # no price
DS_OK = Attempt("deepseek", "deepseek-chat", "ok", 1.0)


def answer(who: dict[str, str], usage: Usage, **fields: Any) -> RequestRecord:
    cost = cost_usd(usage, CONFIG.pricing.get(who["model"]))
    return RequestRecord(
        "req", 200, **(who | {"stream": True, "usage": usage, "cost_usd": cost} | fields)
    )


def traffic() -> Iterator[RequestRecord]:
    """One round of what a proxy sees: answers, a fallback, a cut stream, failures, an
    unpriced model and requests that match no route."""
    for i in range(5):
        yield answer(
            DS,
            Usage(400 + i, 1024, 150 + 10 * i, 20 * (i % 2)),
            stream=i % 2 == 0,
            duration_s=1.0 + i / 4,
            ttft_s=0.2 + i / 10,
            attempts=[DS_OK],
        )
    yield answer(
        GM,
        Usage(300, 0, 90, 0),
        duration_s=4.0,
        ttft_s=2.6,
        attempts=[
            Attempt("deepseek", "deepseek-chat", "first_token_timeout", 2.0),
            Attempt("gemini", "gemini-2.0-flash", "ok", 2.0),
        ],
        fallback_reason="first_token_timeout",
    )
    yield answer(
        DS,
        Usage(350, 0, 40, 0, source="estimated"),
        duration_s=3.0,
        ttft_s=0.4,
        attempts=[DS_OK],
        stream_error="upstream_reset",
    )
    yield answer(
        LABS,
        Usage(120, 0, 60, 0, source="header"),
        duration_s=0.8,
        ttft_s=0.05,
        attempts=[Attempt("local", "free-model", "ok", 0.8)],
    )
    yield RequestRecord(
        "req",
        502,
        **GM,
        stream=False,
        duration_s=5.0,
        error="upstream_error",
        attempts=[
            Attempt("deepseek", "deepseek-chat", "connect_error", 0.1),
            Attempt("gemini", "gemini-2.0-flash", "status_5xx", 0.5),
        ],
    )
    yield RequestRecord("req", 404, error="model_not_found", duration_s=0.001)


@contextlib.contextmanager
def serving(metrics: Metrics) -> Iterator[str]:
    """A real HTTP server whose GET /metrics is `metrics.render()`; yields its host:port."""

    async def endpoint(_: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"content-type": content_type})

    with RunningServer(Starlette(routes=[Route("/metrics", endpoint)])) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def scrape_target() -> Iterator[ScrapeTarget]:
    """A stand-in for the proxy: a real HTTP server whose GET /metrics is `Metrics.render()`,
    fed with constructed records. Swap it for the real proxy (plus SDK requests through it as
    `drive`) and the test below does not change."""
    metrics = Metrics(CONFIG)
    rounds = itertools.count()

    def drive() -> None:
        round_ = next(rounds)
        metrics.request_started("support-bot")  # one stays in flight each round
        for record in traffic():
            if record.route is not None:
                metrics.request_started(record.route)
            metrics.request_finished(record)
        metrics.set_cooldown("deepseek", round_ % 2 == 0)
        metrics.config_reloaded(ok=round_ % 3 != 2)

    with serving(metrics) as address:
        yield ScrapeTarget(address, drive)


KEYS = f"""\
keys:
  team-a: {{sha256: '{"a" * 64}', budget: {{usd: 50.0, period: day}}}}
  team-b: {{sha256: '{"b" * 64}', budget: {{usd: 10.0, period: total}}}}
  open-key: {{sha256: '{"c" * 64}'}}
"""
FLEET_CONFIG = parse_config(ROUTES + KEYS, "routes.yaml", {})


@pytest.fixture(scope="module")
def fleet_target() -> Iterator[ScrapeTarget]:
    """Fleet-state series (issue 15) from a `Metrics` for a config with budgeted keys, told
    what the state store would tell it (its reachability, failed calls, each key's spend).
    Scraped by two jobs, as two pods reading one store: every pod reports the same spend."""
    metrics = Metrics(FLEET_CONFIG)
    periods = {key.name: period_of(key) for key in FLEET_CONFIG.keys}
    rounds = itertools.count()

    def drive() -> None:
        round_ = next(rounds)
        metrics.state_changed(round_ % 4 != 3)  # the store drops out now and then
        for _ in range(round_ % 2):
            metrics.state_failed()
        spend = {"team-a": 0.5 * round_, "team-b": 0.25 * round_, "open-key": 1.0 * round_}
        metrics.set_spend(spend, periods)  # open-key has no budget: no ratio

    with serving(metrics) as address:
        yield ScrapeTarget(address, drive)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(
    what: str, check: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if process.poll() is not None:
            pytest.fail(f"prometheus exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.1)


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr} | ({} if at is None else {"time": str(at)})
        answer = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        return dict(answer.json())

    def wait(self, what: str, check: Callable[[], bool]) -> None:
        _wait(what, check, self.process, self.log)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def live_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapeTarget]:
    """The real thing: sluicegate in front of the mock upstream, driven by the openai SDK."""
    path = tmp_path_factory.mktemp("live") / "routes.yaml"
    with RunningServer(MockUpstream()) as mock:
        path.write_text(
            f"upstreams:\n  mock: {{base_url: '{mock.url}/v1'}}\n"
            "routes:\n  - {model: bot, targets: [{upstream: mock, model: mock-chat}]}\n"
            "pricing:\n  mock-chat: {input: 0.28, output: 0.42}\n"
        )
        with RunningServer(create_app(path, env={}, watch_interval=None)) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)

            def drive() -> None:
                messages: Any = [{"role": "user", "content": "hi"}]
                client.chat.completions.create(model="bot", messages=messages)
                for _ in client.chat.completions.create(
                    model="bot", messages=messages, stream=True
                ):
                    pass

            yield ScrapeTarget(f"127.0.0.1:{proxy.port}", drive)


@pytest.fixture(scope="module")
def guarded_listener() -> Iterator[str]:
    """A metrics listener behind `server.metrics_token`, serving one round of traffic."""
    metrics = Metrics(CONFIG)
    for record in traffic():
        metrics.request_finished(record)
    with RunningServer(MetricsApp(metrics.render, Secret(METRICS_TOKEN))) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def prometheus(
    scrape_target: ScrapeTarget,
    fleet_target: ScrapeTarget,
    live_proxy: ScrapeTarget,
    guarded_listener: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    """A real Prometheus on a loopback port, scraping the target every second."""
    binary = require_binary("prometheus")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = tmp_path / "prometheus.yml"
    token_file = tmp_path / "metrics-token"
    token_file.write_text(METRICS_TOKEN + "\n")  # as `echo` or a mounted Secret leaves it
    guarded = {"static_configs": [{"targets": [guarded_listener]}]}
    settings = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "sluicegate", "static_configs": [{"targets": [scrape_target.address]}]},
            # Twice, as two pods that read one shared store: the same spend from each.
            {"job_name": "fleet", "static_configs": [{"targets": [fleet_target.address]}]},
            {"job_name": "fleet-2", "static_configs": [{"targets": [fleet_target.address]}]},
            {"job_name": "proxy", "static_configs": [{"targets": [live_proxy.address]}]},
            {"job_name": "guarded", "authorization": {"credentials_file": str(token_file)}}
            | guarded,
            {"job_name": "no_token"} | guarded,
        ],
    }
    config.write_text(json.dumps(settings))  # JSON is YAML
    port, log = _free_port(), tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        server.wait("/-/ready", lambda: _ok(f"{server.url}/-/ready"))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _scrapes(server: Prometheus, job: str = "sluicegate") -> int:
    result = server.query(f'sum_over_time(up{{job="{job}"}}[1m])')["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def test_every_dashboard_query_returns_data(
    prometheus: Prometheus, scrape_target: ScrapeTarget, fleet_target: ScrapeTarget
) -> None:
    # A rate needs two samples in its window, each scrape seeing new traffic.
    def traffic_scraped() -> bool:
        scrape_target.drive()
        fleet_target.drive()
        return _scrapes(prometheus) >= 3 and _scrapes(prometheus, "fleet") >= 3

    prometheus.wait("3 successful scrapes", traffic_scraped)

    empty, failed = [], []
    for where, expr in dashboard_queries():
        answer = prometheus.query(substitute(expr))
        if answer.get("status") != "success":
            failed.append(f"{where}: {answer.get('error')} in {expr}")
        elif not answer["data"]["result"]:
            empty.append(f"{where}: {expr}")
    assert failed == []
    assert empty == []


def test_alert_rules_evaluate_cleanly_on_live_data(
    prometheus: Prometheus, scrape_target: ScrapeTarget
) -> None:
    def rules() -> list[dict[str, Any]]:
        answer = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    def evaluated_twice() -> bool:
        scrape_target.drive()
        return _scrapes(prometheus) >= 2 and all(
            not r["lastEvaluation"].startswith("0001") for r in rules()
        )

    prometheus.wait("rule evaluations", evaluated_twice)
    names = re.findall(r"- alert: (\w+)", (RULES / "alerts.yml").read_text())
    assert {r["name"]: r["health"] for r in rules()} == dict.fromkeys(names, "ok")


def test_prometheus_scrapes_the_real_proxy_under_traffic(
    prometheus: Prometheus, live_proxy: ScrapeTarget
) -> None:
    def traffic_scraped() -> bool:
        live_proxy.drive()
        expr = 'max(count_over_time(sluicegate_requests_total{job="proxy"}[1m]))'
        result = prometheus.query(expr)["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) >= 3

    prometheus.wait("3 scrapes of the proxy with traffic", traffic_scraped)
    queries = [
        'sum by (route, status) (rate(sluicegate_requests_total{job="proxy"}[1m]))',
        'sum by (type) (rate(sluicegate_tokens_total{job="proxy"}[1m]))',
        "histogram_quantile(0.95, sum by (le) (rate("
        'sluicegate_time_to_first_token_seconds_bucket{job="proxy"}[1m])))',
        'sum(increase(sluicegate_cost_usd_total{job="proxy"}[1m])) > 0',
    ]
    for expr in queries:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", answer
        assert answer["data"]["result"], expr


def test_prometheus_sends_the_metrics_token_from_a_credentials_file(
    prometheus: Prometheus,
) -> None:
    def scraped() -> bool:
        result = prometheus.query('up{job=~"guarded|no_token"}')["data"]["result"]
        return {r["metric"]["job"]: r["value"][1] for r in result} == {
            "guarded": "1",  # `authorization: {credentials_file: ...}`, trailing newline and all
            "no_token": "0",  # 401: the scrape fails, and no series come in
        }

    prometheus.wait("a scrape of the guarded listener, with and without the token", scraped)
    answer = prometheus.query('sum(sluicegate_requests_total{job="guarded"})')
    assert float(answer["data"]["result"][0]["value"][1]) == len(list(traffic()))
    assert (
        prometheus.query('count({job="no_token", __name__=~"sluicegate_.*"})')["data"]["result"]
        == []
    )


def panel_expr(title: str) -> str:
    board = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in board["panels"] if p["title"] == title]
    (target,) = panel["targets"]
    return str(target["expr"])


def test_budget_used_by_key_is_each_budgeted_keys_spend_over_its_budget(
    prometheus: Prometheus, fleet_target: ScrapeTarget
) -> None:
    def scraped() -> bool:
        fleet_target.drive()
        return _scrapes(prometheus, "fleet") >= 2

    prometheus.wait("2 scrapes of the fleet series", scraped)
    at = time.time()
    answer = prometheus.query(panel_expr("Budget used by key"), at)
    used = {
        (r["metric"]["key"], r["metric"]["period"]): float(r["value"][1])
        for r in answer["data"]["result"]
    }
    assert set(used) == {("team-a", "day"), ("team-b", "total")}, "open-key has no budget"
    for (key, _), ratio in used.items():
        spend = prometheus.query(f'max(sluicegate_key_spend_usd{{key="{key}"}})', at)
        budget = prometheus.query(f'max(sluicegate_key_budget_usd{{key="{key}"}})', at)
        expected = float(spend["data"]["result"][0]["value"][1]) / float(
            budget["data"]["result"][0]["value"][1]
        )
        assert ratio == pytest.approx(expected)
