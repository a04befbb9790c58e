"""/metrics on its own port, and behind a bearer token: the listener, the settings that place
it (flags over the routes file), the config errors, and the real `sluicegate serve` with one
worker and with two, whose counts the supervisor's listener adds up."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.config import Config, ConfigError, Secret, ServerSettings, load_config, parse_config
from proxy.errors import MetricsUnauthorized, NotReady
from proxy.observe.metrics_server import (
    Listener,
    ListenError,
    MetricsApp,
    authorize,
    listener,
    restart_needed,
    start,
)
from proxy.serving import RunningServer
from tests.helpers import ROOT, free_port, sluicegate, wait_for

TOKEN = "mt-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
EXPOSITION = b"# TYPE sluicegate_demo_total counter\nsluicegate_demo_total 3.0\n"
TEXT = "text/plain; version=0.0.4; charset=utf-8"
MESSAGES = [{"role": "user", "content": "hi"}]


# --- the token check --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (None, False),
        (b"", False),
        (b"Bearer", False),
        (b"Bearer ", False),
        (f"Bearer {TOKEN[:-1]}".encode(), False),
        (f"Bearer {TOKEN}x".encode(), False),
        (f"Basic {TOKEN}".encode(), False),
        (TOKEN.encode(), False),
        (f"Bearer {TOKEN}".encode(), True),
        (f"bearer {TOKEN}".encode(), True),
        (f"  Bearer   {TOKEN}  ".encode(), True),
        ("Bearer 令牌".encode(), False),
    ],
)
def test_authorize(header: bytes | None, ok: bool) -> None:
    authorize(header, None)  # no token: anything goes
    if ok:
        authorize(header, Secret(TOKEN))
        return
    with pytest.raises(MetricsUnauthorized) as info:
        authorize(header, Secret(TOKEN))
    assert TOKEN[:8] not in info.value.message
    assert info.value.status == 401


# --- the listener, in process ---------------------------------------------------------------

# (what, method, path, Authorization, status, code): the README's table is made from this.
Case = tuple[str, str, str, str | None, int, str | None]
CASES: list[Case] = [
    ("no Authorization", "GET", "/metrics", None, 401, "invalid_api_key"),
    ("a wrong token", "GET", "/metrics", "Bearer wrong-token", 401, "invalid_api_key"),
    ("the token under another scheme", "GET", "/metrics", f"Basic {TOKEN}", 401, "invalid_api_key"),
    ("the token", "GET", "/metrics", f"Bearer {TOKEN}", 200, None),
    ("the token, scheme in lower case", "GET", "/metrics", f"bearer {TOKEN}", 200, None),
    ("no Authorization", "GET", "/healthz", None, 200, None),
    ("the token", "POST", "/metrics", f"Bearer {TOKEN}", 405, "method_not_allowed"),
    ("the token", "GET", "/v1/models", f"Bearer {TOKEN}", 404, "not_found"),
    ("the token, a percent-escape", "GET", "/%6detrics", f"Bearer {TOKEN}", 404, "not_found"),
]


@pytest.fixture(scope="module")
def guarded() -> Iterator[RunningServer]:
    with RunningServer(MetricsApp(lambda: (EXPOSITION, TEXT), Secret(TOKEN))) as server:
        yield server


@pytest.mark.parametrize("case", CASES, ids=[f"{m} {p}, {w}" for w, m, p, *_ in CASES])
def test_the_metrics_listener_answers(guarded: RunningServer, case: Case) -> None:
    what, method, path, auth, status, code = case
    headers = {"authorization": auth} if auth else {}
    answer = httpx.request(method, guarded.url + path, headers=headers, timeout=5)
    assert answer.status_code == status, what
    assert "server" not in answer.headers  # as on the main port
    if code is None:
        assert answer.content == (EXPOSITION if path == "/metrics" else b'{"status":"ok"}')
        return
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, None)
    assert set(error) == {"message", "type", "param", "code"}
    assert TOKEN not in answer.text
    if status == 401:
        assert answer.headers["www-authenticate"] == 'Bearer realm="metrics"'


def test_a_listener_without_a_token_serves_anyone_and_says_when_not_ready() -> None:
    ready: list[bool] = []

    def render() -> tuple[bytes, str]:
        if not ready:
            raise NotReady("sluicegate is starting")
        return EXPOSITION, TEXT

    with RunningServer(MetricsApp(render, None)) as server:
        starting = httpx.get(server.url + "/metrics")
        assert (starting.status_code, starting.json()["error"]["code"]) == (503, "not_ready")
        ready.append(True)
        answer = httpx.get(server.url + "/metrics")
        assert (answer.status_code, answer.content) == (200, EXPOSITION)
        assert answer.headers["content-type"] == TEXT


def test_start_binds_before_it_returns_and_names_a_taken_address() -> None:
    assert start(None, lambda: (EXPOSITION, TEXT), None) is None
    with capture_logs() as logs:
        server = start(Listener("127.0.0.1", free_port()), lambda: (EXPOSITION, TEXT), None)
    assert server is not None
    try:
        assert httpx.get(server.url + "/metrics").content == EXPOSITION
        assert [(e["event"], e["protected"]) for e in logs] == [("metrics_listening", False)]
        taken = Listener("127.0.0.1", server.port)
        with pytest.raises(ListenError, match=rf"/metrics on 127\.0\.0\.1:{server.port}: \w"):
            start(taken, lambda: (EXPOSITION, TEXT), Secret(TOKEN))
    finally:
        server.stop()
    assert str(Listener("::1", 9100)) == "[::1]:9100"


# --- where it listens: flags over the file over the main host ---------------------------------


@pytest.mark.parametrize(
    ("file", "flags", "expected"),
    [
        ({}, (None, None), None),
        ({"metrics_port": 9100}, (None, None), ("0.0.0.0", 9100)),
        ({"metrics_port": 9100, "metrics_host": "127.0.0.1"}, (None, None), ("127.0.0.1", 9100)),
        ({"metrics_port": 9100}, (8081, None), ("0.0.0.0", 8081)),
        ({"metrics_port": 9100, "metrics_host": "127.0.0.1"}, (8081, None), ("127.0.0.1", 8081)),
        ({"metrics_port": 9100, "metrics_host": "127.0.0.1"}, (8081, "::1"), ("::1", 8081)),
        ({}, (8081, None), ("0.0.0.0", 8081)),
    ],
)
def test_flags_win_over_the_file_and_the_host_defaults_to_the_main_one(
    file: dict[str, object], flags: tuple[int | None, str | None], expected: object
) -> None:
    got = listener(ServerSettings(**file), "0.0.0.0", *flags)  # type: ignore[arg-type]
    assert (None if got is None else (got.host, got.port)) == expected


def test_a_reload_that_moves_the_listener_names_what_needs_a_restart() -> None:
    before = ServerSettings(metrics_port=9100, metrics_token=Secret(TOKEN))
    same = ServerSettings(metrics_port=9100, metrics_token=Secret(TOKEN), max_inflight=5)
    assert restart_needed(before, same) == []
    after = ServerSettings(metrics_port=9101, metrics_host="127.0.0.1", max_inflight=5)
    assert restart_needed(before, after) == [
        "server.metrics_port",
        "server.metrics_host",
        "server.metrics_token",
    ]


def test_a_reload_that_changes_a_connection_limit_names_what_needs_a_restart() -> None:
    before = ServerSettings()
    after = ServerSettings(max_header_bytes=4096, header_timeout=3.0, max_connections=10)
    assert restart_needed(before, ServerSettings(max_inflight=5)) == []
    assert restart_needed(before, after) == [
        "server.max_header_bytes",
        "server.header_timeout",
        "server.max_connections",
    ]


# --- the routes file --------------------------------------------------------------------------

UPSTREAMS = """\
upstreams:
  u: {base_url: 'http://127.0.0.1:9/v1'}
routes:
  - {model: m, targets: [{upstream: u, model: x}]}
"""


def parse(server: str, env: dict[str, str] | None = None, main_port: int | None = None) -> Config:
    text = "server:\n" + server + UPSTREAMS
    return parse_config(text, "routes.yaml", env or {}, main_port=main_port)


def test_the_metrics_settings_parse_and_the_token_stays_hidden() -> None:
    text = "  metrics_port: ${MPORT}\n  metrics_host: '::'\n  metrics_token: ${METRICS_TOKEN}\n"
    config = parse_config(
        "server:\n" + text + UPSTREAMS, "r.yaml", {"MPORT": "9100", "METRICS_TOKEN": TOKEN}
    )
    server = config.server
    assert (server.metrics_port, server.metrics_host) == (9100, "::")
    assert server.metrics_token == Secret(TOKEN)
    assert TOKEN not in repr(config) + str(server)
    assert parse_config(UPSTREAMS, "r.yaml", {}).server.metrics_token is None


# (the server: section, its environment, where, what): one issue each, at file:line: path.
BAD = [
    ("metrics_port: 0", {}, "2 metrics_port", "must be 1 or more, got number 0"),
    ("metrics_port: 70000", {}, "2 metrics_port", "must be 65535 or less, got number 70000"),
    ("metrics_port: ${P}", {"P": "1e6"}, "2 metrics_port", "expected an integer, got the exp"),
    ("metrics_port: ${P}", {"P": "99999"}, "2 metrics_port", "must be 65535 or less, got the"),
    ("metrics_port: '9100'", {}, "2 metrics_port", "expected an integer, got string '9100'"),
    ("metrics_port: true", {}, "2 metrics_port", "expected an integer, got boolean true"),
    ("metrics_port: 9.5", {}, "2 metrics_port", "expected an integer, got number 9.5"),
    ("max_inflight: 5; metrics_host: ::1", {}, "3 metrics_host", "needs server.metrics_port"),
    ("metrics_port: 1; metrics_host: http://h", {}, "3 metrics_host", "expected a host name or"),
    ("metrics_port: 1; metrics_host: ''", {}, "3 metrics_host", "expected a non-empty string"),
    ("metrics_token: 8675309", {}, "2 metrics_token", "expected a string, got another type"),
    ("metrics_token: [a]", {}, "2 metrics_token", "expected a string, got another type"),
    ("metrics_token: ${T}", {}, "2 metrics_token", "environment variable T is not set"),
    ("metrics_token: ${T}", {"T": ""}, "2 metrics_token", "expected a non-empty string"),
    ("metrics_token: ${T:-}", {}, "2 metrics_token", "expected a non-empty string"),
    ("metrics_token: ${T}", {"T": "8675309\n"}, "2 metrics_token", "expected printable ASCII"),
    ("metrics_token: ${T}", {"T": "867 5309"}, "2 metrics_token", "expected printable ASCII"),
    ("metrics_tokn: x", {}, "2 metrics_tokn", "unknown key 'metrics_tokn' (did you mean 'metr"),
]


@pytest.mark.parametrize(("server", "env", "where", "what"), BAD)
def test_bad_metrics_settings_name_file_line_and_path(
    server: str, env: dict[str, str], where: str, what: str
) -> None:
    text = "".join(f"  {line}\n" for line in server.split("; "))
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    line, key = where.split()
    (issue,) = map(str, info.value.issues)
    assert issue.startswith(f"routes.yaml:{line}: server.{key}: {what}")
    assert "8675309" not in issue  # a token is never echoed, not even a mistyped one


def test_the_metrics_port_must_not_be_the_main_port_when_that_is_known() -> None:
    assert parse("  metrics_port: 8080\n").server.metrics_port == 8080
    with pytest.raises(ConfigError) as info:
        parse("  metrics_port: 8080\n", main_port=8080)
    expected = "routes.yaml:2: server.metrics_port: must differ from the main port (--port 8080)"
    assert str(info.value) == expected


def test_load_config_checks_the_main_port_only_when_told(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("server: {metrics_port: 8080}\n" + UPSTREAMS)
    assert load_config(path, {}).server.metrics_port == 8080
    with pytest.raises(ConfigError, match=r"routes\.yaml:1: server\.metrics_port: must differ"):
        load_config(path, {}, main_port=8080)


# --- the main app: token on the main port, or no /metrics there at all ------------------------


def _routes(mock_url: str, server: str = "") -> str:
    return (
        (f"server:\n{server}" if server else "")
        + f"upstreams:\n  mock: {{base_url: '{mock_url}/v1'}}\n"
        + "routes:\n  - {model: bot, targets: [{upstream: mock, model: mock-chat}]}\n"
    )


def _chat(url: str) -> None:
    body = {"model": "bot", "messages": MESSAGES, "mock": {"tokens": 3, "delay": 0}}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200


def requests_counted(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "sluicegate_requests_total" and s.labels["route"] == "bot"
    )


def test_the_token_guards_metrics_on_the_main_port(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url, "  metrics_token: ${METRICS_TOKEN}\n"))
    app = create_app(path, env={"METRICS_TOKEN": TOKEN}, watch_interval=None)
    with RunningServer(app) as proxy:
        _chat(proxy.url)
        refused = httpx.get(proxy.url + "/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(proxy.url + "/metrics", headers={"authorization": "Bearer x"})
        assert wrong.status_code == 401
        right = httpx.get(proxy.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert requests_counted(right.text) == 1
        assert httpx.post(proxy.url + "/metrics").status_code == 405  # as before


def test_without_the_metrics_route_the_main_port_answers_404_and_the_cli_can_render(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url))
    app = create_app(path, env={}, watch_interval=None, metrics_route=False)
    with pytest.raises(NotReady):
        app.state.render_metrics()
    with RunningServer(app) as proxy:
        _chat(proxy.url)
        answer = httpx.get(proxy.url + "/metrics")
        assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found")
        assert requests_counted(app.state.render_metrics()[0].decode()) == 1


def test_a_reload_that_changes_the_metrics_settings_warns_they_need_a_restart(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url))
    app = create_app(path, env={"METRICS_TOKEN": TOKEN}, watch_interval=0.02)
    with capture_logs() as logs, RunningServer(app) as proxy:
        path.write_text(_routes(mock_server.url, "  metrics_token: ${METRICS_TOKEN}\n"))
        assert wait_for(lambda: any(e["event"] == "restart_needed" for e in logs))
        assert httpx.get(proxy.url + "/metrics").status_code == 200  # still as started
    (warning,) = [e for e in logs if e["event"] == "restart_needed"]
    assert warning["settings"] == ["server.metrics_token"]
    assert TOKEN not in repr(logs)


# --- the real command ---------------------------------------------------------------------------


def _drive(url: str, count: int) -> None:
    body = {"model": "bot", "messages": MESSAGES, "mock": {"tokens": 3, "delay": 0}}
    for _ in range(count):  # a fresh connection each: the kernel spreads them over workers
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200


def _settled(url: str, count: int, headers: dict[str, str] | None = None) -> Callable[[], bool]:
    def check() -> bool:
        answer = httpx.get(url + "/metrics", headers=headers, timeout=5)
        return answer.status_code == 200 and requests_counted(answer.text) == count

    return check


def test_serve_moves_metrics_to_the_flag_port_over_the_files(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    file_port, flag_port = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    server = f"  metrics_port: {file_port}\n  metrics_host: 127.0.0.1\n"
    path.write_text(_routes(mock_server.url, server))
    args = ("serve", "--config", str(path), "--no-watch", "--metrics-port", str(flag_port))
    with sluicegate(*args) as (_, url):
        metrics_url = f"http://127.0.0.1:{flag_port}"
        _drive(url, 5)
        assert wait_for(_settled(metrics_url, 5))
        assert httpx.get(url + "/metrics").status_code == 404
        assert httpx.get(metrics_url + "/healthz").json() == {"status": "ok"}
        with pytest.raises(httpx.ConnectError):  # the file's port is not used: the flag won
            httpx.get(f"http://127.0.0.1:{file_port}/metrics")


def test_two_workers_one_guarded_listener_with_the_totals_of_both(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    metrics_port = free_port()
    path = tmp_path / "routes.yaml"
    server = f"  metrics_port: {metrics_port}\n  metrics_token: ${{METRICS_TOKEN}}\n"
    path.write_text(_routes(mock_server.url, server))
    log = tmp_path / "sluicegate.log"
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    auth = {"authorization": f"Bearer {TOKEN}"}
    args = ("serve", "--config", str(path), "--workers", "2", "--no-watch")
    with (
        log.open("wb") as sink,
        sluicegate(*args, env={"METRICS_TOKEN": TOKEN}, output=sink) as (
            _,
            url,
        ),
    ):
        _drive(url, 30)
        assert wait_for(_settled(metrics_url, 30, auth))
        bodies = []
        for headers in ({}, {"authorization": "Bearer " + TOKEN[:-1]}, {"authorization": TOKEN}):
            refused = httpx.get(metrics_url + "/metrics", headers=headers)
            assert refused.status_code == 401
            bodies.append(refused.text)
        main = httpx.get(url + "/metrics", headers=auth)
        assert (main.status_code, main.json()["error"]["code"]) == (404, "not_found")
        bodies.append(main.text)
        assert httpx.get(metrics_url + "/healthz").status_code == 200
    assert all(TOKEN[:8] not in body for body in bodies)
    output = log.read_text()
    assert "metrics_listening" in output
    assert len(re.findall(r"\bready\b", output)) >= 2  # both workers started
    assert TOKEN[:8] not in output


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("--metrics-host", "127.0.0.1"), 2, "--metrics-host needs --metrics-port"),
        (("--port", "8123", "--metrics-port", "8123"), 2, r"must differ from --port \(8123\)"),
        (("--metrics-port", "0"), 2, "a port is 1-65535"),
        (("--port", "8124"), 1, r"routes\.yaml:1: server\.metrics_port: must differ from the main"),
    ],
)
def test_serve_refuses_a_listener_that_cannot_work(
    tmp_path: Path, args: tuple[str, ...], status: int, message: str
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("server: {metrics_port: 8124}\n" + UPSTREAMS)
    result = _serve("--config", str(path), *args)
    assert result.returncode == status, result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_serve_stops_at_once_when_the_metrics_port_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(UPSTREAMS)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve(
            "--config", str(path), "--port", str(free_port()), "--metrics-port", str(port)
        )
    assert result.returncode == 1
    assert f"cannot listen for /metrics on 127.0.0.1:{port}:" in result.stderr


# --- the README's table -------------------------------------------------------------------------


def readme_rows() -> list[str]:
    rows = []
    for what, method, path, _, status, code in CASES:
        rows.append(f"| {method} {path}, {what} | {status}" + (f" `{code}` |" if code else " |"))
    return rows


def test_the_readme_table_lists_every_listener_case() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    assert [row for row in readme_rows() if row not in readme] == []
