"""The `sluicegate` command: check, serve --demo, mock-upstream (as real subprocesses)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from proxy import cli
from tests.helpers import ROOT, free_port, sluicegate

CONFIGS = Path(__file__).resolve().parent / "configs"
FAKE_KEYS = {"DEEPSEEK_API_KEY": "sk-deepseek-fake-000", "GEMINI_API_KEY": "AIza-fake-000"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def test_check_accepts_the_committed_routes_yaml() -> None:
    result = _run("check", "routes.yaml", env=FAKE_KEYS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: routes.yaml: 3 upstreams, 2 routes")
    assert "sk-deepseek-fake" not in result.stdout + result.stderr


def test_check_names_a_missing_environment_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k not in FAKE_KEYS}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "routes.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    assert re.search(
        r"routes\.yaml:\d+: upstreams\.deepseek\.api_key: .*DEEPSEEK_API_KEY", result.stderr
    )


def test_there_are_broken_configs_to_check() -> None:
    assert len(list(CONFIGS.glob("broken_*.yaml"))) >= 3


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("broken_*.yaml")), ids=lambda p: p.stem)
def test_check_reports_every_error_with_file_line_and_path(path: Path) -> None:
    result = _run("check", str(path))
    assert result.returncode == 1
    issue_lines = [line for line in result.stderr.splitlines() if line.startswith(str(path))]
    assert issue_lines, result.stderr
    for line in issue_lines[:-1]:  # the last line is the count
        assert re.match(re.escape(str(path)) + r":\d+: ", line), line
    assert result.stdout == ""


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    out = tmp_path / "demo.out"
    with out.open("wb") as sink, sluicegate("serve", "--demo", output=sink) as (_, url):
        yield url, out


def test_demo_serves_a_streamed_answer_offline(demo: tuple[str, Path]) -> None:
    url, _ = demo
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="support-bot", stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(text) > 20


def test_demo_prints_url_and_examples(demo: tuple[str, Path]) -> None:
    url, out = demo
    printed = out.read_text()
    assert f"{url}/v1" in printed
    assert "curl -N" in printed
    assert "from openai import OpenAI" in printed


def test_mock_upstream_command_serves_chat() -> None:
    with sluicegate("mock-upstream", ready="/healthz") as (_, url):
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.json()["choices"][0]["message"]["content"]


def test_serve_refuses_a_broken_config_readably(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("upstreams: {}\nroutes: []\nbogus: 1\n")
    result = _run("serve", "--config", str(bad), "--port", str(free_port()))
    assert result.returncode == 1
    assert f"{bad}:3: bogus: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "level", "server_level"),
    [
        ([], logging.INFO, "warning"),
        (["--log-level", "debug"], logging.DEBUG, "warning"),
        (["--log-level", "error"], logging.ERROR, "error"),
    ],
)
def test_serve_log_level_sets_the_proxy_logs_and_uvicorn_s(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flag: list[str],
    level: int,
    server_level: str,
) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "configure_logs", lambda **kw: seen.update(kw))
    monkeypatch.setattr(uvicorn, "run", lambda _app, **kw: seen.update(kw))
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams: {m: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "routes: [{model: m, targets: [{upstream: m, model: m}]}]\n"
    )
    assert cli.main(["serve", "--config", str(path), *flag]) == 0
    assert (seen["level"], seen["log_level"]) == (level, server_level)


def test_serve_refuses_an_unknown_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--log-level", "verbose"])
    assert exited.value.code == 2
    assert "--log-level: invalid choice: 'verbose'" in capsys.readouterr().err
