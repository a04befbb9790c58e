"""Hostile configs and hostile clients, against real `sluicegate` processes and raw sockets:
each is refused with a clear message while a well-behaved client goes on being served.

The well-behaved client (`Prober`) streams through the openai SDK in a thread of its own the
whole time; its slowest time to first token is the real assertion: the event loop was never
pinned. The bound is generous (TTFT_BOUND) against the mock's 0 s TTFT, and what each attack
cost on the code before its fix is noted with the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import MAX_YAML_VALUES
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.serving import RunningServer
from tests.helpers import ROOT, Prober, sluicegate, wait_for

HI: Any = [{"role": "user", "content": "hi"}]


def yaml_bomb(levels: int, width: int = 9) -> str:
    """`width ** levels` values from a few hundred bytes of nested aliases."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


MOCK = MockUpstream(Knobs(ttft=0.0, delay=0.0, tokens=2))


@pytest.fixture(scope="module")
def mock() -> Iterator[RunningServer]:
    with RunningServer(MOCK) as server:
        yield server


def _routes(mock_url: str) -> str:
    return (
        f"upstreams:\n  mock: {{base_url: '{mock_url}/v1'}}\n"
        "routes:\n  - {model: bot, targets: [{upstream: mock, model: m}]}\n"
    )


def test_a_yaml_alias_bomb_reloaded_is_refused_while_clients_are_served(
    tmp_path: Path, mock: RunningServer
) -> None:
    """Before the fix, this 345-byte file blocked the loop for ~3 s (a 619-byte one: 49 s,
    then the process died); now it is refused in a quarter second, off the loop."""
    path, log = tmp_path / "routes.yaml", tmp_path / "proxy.log"
    path.write_text(_routes(mock.url))
    args = ["serve", "--config", str(path)]
    with (
        log.open("wb") as sink,
        sluicegate(*args, output=sink) as (proc, url),
        Prober(url) as probe,
    ):
        served = len(probe.ttfts)
        path.write_text(_routes(mock.url) + yaml_bomb(6, 10))
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: '"config_reload_refused"' in log.read_text(), 30)
        after = len(probe.ttfts)
        assert wait_for(lambda: len(probe.ttfts) > after + 2, 30)  # the ones sent meanwhile too
        probe.assert_served(served)
    text = log.read_text()
    assert f"aliases expand to more than {MAX_YAML_VALUES} values" in text
    assert '"config_reloaded"' not in text  # the old config kept serving


def test_check_refuses_a_yaml_alias_bomb_promptly_with_file_line_and_path(
    tmp_path: Path,
) -> None:
    """The issue's 619-byte bomb (9 ** 12 values): before the fix `check` ran out of memory."""
    path = tmp_path / "bomb.yaml"
    path.write_text("upstreams:\n  x:\n    base_url: http://h\n" + yaml_bomb(12))
    assert len(path.read_bytes()) < 700
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    message = f"invalid YAML: aliases expand to more than {MAX_YAML_VALUES} values"
    assert f"{path}:9: a5[" in result.stdout + result.stderr  # at `a5: &a5 [...]`, 9 ** 6
    assert message in result.stdout + result.stderr


def test_a_megabyte_model_name_is_clipped_in_the_error_and_the_access_log(
    tmp_path: Path, mock: RunningServer
) -> None:
    """Before the fix, these 20 requests wrote 21 MB of log in 0.6 s."""
    path, log = tmp_path / "routes.yaml", tmp_path / "proxy.log"
    path.write_text("server: {max_echoed_chars: 50}\n" + _routes(mock.url))
    name = "m" * 1024 * 1024
    args = ["serve", "--config", str(path)]
    with log.open("wb") as sink, sluicegate(*args, output=sink) as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for _ in range(20):
            with pytest.raises(openai.NotFoundError) as missing:
                client.chat.completions.create(model=name, messages=HI)
            assert missing.value.code == "model_not_found"
            assert len(missing.value.response.content) < 500
            message = missing.value.body["message"]  # type: ignore[index]
            assert f"'{'m' * 50}… (1048576 characters)'" in message
    text = log.read_text()
    assert text.count('"status":404') == 20
    assert len(text) < 20_000


# --- web pages: cross-site requests and DNS rebinding -----------------------------------------

PAGE = "https://app.example"
BROWSER_BODY = b'{"model": "bot", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def browsers(
    tmp_path_factory: pytest.TempPathFactory, mock: RunningServer
) -> Iterator[tuple[RunningServer, RunningServer]]:
    """An open proxy that lists one page and its own names; and the same with a client key."""
    tmp = tmp_path_factory.mktemp("browsers")
    server = f"server: {{cors_origins: ['{PAGE}'], allowed_hosts: [127.0.0.1, localhost]}}\n"
    key = "keys: {app: {sha256: '%s'}}\n" % ("0" * 64)
    (tmp / "open.yaml").write_text(server + _routes(mock.url))
    (tmp / "keyed.yaml").write_text(server + _routes(mock.url) + key)
    apps = (
        create_app(tmp / f"{name}.yaml", env={}, watch_interval=None) for name in ("open", "keyed")
    )
    with RunningServer(next(apps)) as open_, RunningServer(next(apps)) as keyed:
        yield open_, keyed


def _browser_post(url: str, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=BROWSER_BODY, headers=headers)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"content-type": "text/plain;charset=UTF-8"}, 415, "unsupported_content_type"),
        ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_content_type"),
        ({}, 415, "unsupported_content_type"),  # fetch() with a Blob body: no type at all
        ({"content-type": "application/json", "origin": "https://evil.example"}, 403, None),
        ({"content-type": "application/json", "origin": "null"}, 403, None),  # sandboxed frame
        ({"content-type": "application/json", "host": "evil.example"}, 421, "host_not_allowed"),
        ({"content-type": "application/json", "host": "localhost.evil.example"}, 421, None),
    ],
    ids=["text-plain", "form", "no-type", "other-origin", "null-origin", "rebound", "suffix"],
)
def test_what_a_web_page_can_send_to_an_open_proxy_is_refused_before_any_upstream(
    browsers: tuple[RunningServer, RunningServer],
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    """Before the fix, every one of these reached the upstream and got its answer."""
    before = len(MOCK.records)
    r = _browser_post(browsers[0].url, **headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == (code or {403: "origin_not_allowed", 421: "host_not_allowed"}[status])
    assert len(MOCK.records) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "Application/JSON", "origin": PAGE},  # listed
        {"content-type": "application/json", "origin": "{own}"},  # the playground's own page
        {"content-type": "application/json", "host": "localhost:{port}"},
    ],
    ids=["charset", "listed-origin", "same-origin", "allowed-host"],
)
def test_json_from_the_proxy_s_own_page_or_a_listed_one_is_served(
    browsers: tuple[RunningServer, RunningServer], headers: dict[str, str]
) -> None:
    proxy = browsers[0]
    own = {k: v.format(own=proxy.url, port=proxy.port) for k, v in headers.items()}
    r = _browser_post(proxy.url, **own)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_probes_answer_any_host_and_a_keyed_proxy_takes_any_origin(
    browsers: tuple[RunningServer, RunningServer],
) -> None:
    open_, keyed = browsers
    for path in ("/healthz", "/readyz"):
        assert httpx.get(open_.url + path, headers={"host": "10.1.2.3:8080"}).status_code == 200
    assert httpx.get(open_.url + "/v1/models", headers={"host": "evil.example"}).status_code == 421
    # With client keys a page cannot call the proxy without one: its Origin is not checked.
    r = _browser_post(keyed.url, **{"content-type": "application/json", "origin": "https://x.y"})
    assert r.status_code == 401
