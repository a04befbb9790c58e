"""The access log: one JSON line per request with what operators need, and never a secret."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
from structlog.processors import JSONRenderer
from structlog.testing import capture_logs

from proxy.mock.upstream import MockUpstream
from proxy.observe.logs import PROCESSORS, access_log, redact
from proxy.record import Attempt, RequestRecord, Usage
from proxy.serving import RunningServer
from tests.helpers import sluicegate

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-proj-Zx81fQ2mLk4RtY7uPq0vWb3nHs6dJc9eAa5gTi1oKl"
CLIENT_KEY = "sk-live-client-Qw3Er5Ty7Ui9Op1As3Df5Gh7Jk9Lz2Xc4Vb6Nm8"
PROMPT = "my secret order number is 4412-7781"


def test_log_lines_carry_the_request_and_no_secret(
    tmp_path: Path, mock_app: MockUpstream, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams:\n"
        f"  mock: {{base_url: '{mock_server.url}/v1', api_key: '${{MOCK_KEY}}'}}\n"
        "routes:\n  - {model: bot, targets: [{upstream: mock, model: mock-chat}]}\n"
        "pricing:\n  mock-chat: {input: 0.28, output: 0.42}\n"
    )
    log = tmp_path / "proxy.log"
    env = {"MOCK_KEY": UPSTREAM_KEY}
    with (
        log.open("wb") as sink,
        sluicegate("serve", "--config", str(path), env=env, output=sink) as (
            _,
            url,
        ),
    ):
        client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        messages = [{"role": "user", "content": PROMPT}]
        client.chat.completions.create(model="bot", messages=messages)  # type: ignore[arg-type]
        for _ in client.chat.completions.create(model="bot", messages=messages, stream=True):  # type: ignore[arg-type]
            pass
        bad = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "nope", "messages": messages},
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
        )
        metrics = httpx.get(url + "/metrics").text
    assert mock_app.records[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    everything = log.read_text() + metrics + bad.text
    for secret in (UPSTREAM_KEY, CLIENT_KEY, PROMPT):
        assert secret not in everything
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 3
    streamed = next(r for r in requests if r.get("stream") is True)
    assert streamed["route"] == "bot"
    assert (streamed["upstream"], streamed["model"], streamed["status"]) == (
        "mock",
        "mock-chat",
        200,
    )
    assert streamed["usage"]["source"] == "reported"
    assert streamed["usage"]["output"] == 16
    assert streamed["cost_usd"] > 0
    assert streamed["ttft_s"] <= streamed["duration_s"]
    assert [a["outcome"] for a in streamed["attempts"]] == ["ok"]
    assert {"request_id", "timestamp", "level"} <= streamed.keys()
    unknown = next(r for r in requests if r["status"] == 404)
    assert unknown["error"] == "model_not_found"


def _routes(tmp_path: Path, mock_url: str, keys: str = "") -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"upstreams:\n  mock: {{base_url: '{mock_url}/v1'}}\n"
        "routes:\n  - {model: bot, targets: [{upstream: mock, model: mock-chat}]}\n" + keys
    )
    return path


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_workers_log_json_lines_through_the_redaction_step(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    """Each worker is a fresh interpreter: it must set up the renderer and `redact` itself."""
    keys = f"keys:\n  app: {{sha256: '{'0' * 64}'}}\n"
    path = _routes(tmp_path, mock_server.url, keys)
    log = tmp_path / "proxy.log"
    with (
        log.open("wb") as sink,
        sluicegate("serve", "--config", str(path), "--workers", "2", output=sink) as (_, url),
    ):
        refused = httpx.post(url + "/v1/chat/completions", json={"model": "bot"})
    assert refused.status_code == 401
    # The 401's own message reads "... 'Authorization: Bearer YOUR_KEY'.": in the log line
    # the redaction step has masked what follows "Bearer", placeholder or not.
    assert "Bearer YOUR_KEY" in refused.json()["error"]["message"]
    text = log.read_text()
    requests = [line for line in _json_lines(text) if line["event"] == "request"]
    assert len(requests) == 1, f"no JSON request line in:\n{text}"
    assert (requests[0]["level"], requests[0]["status"]) == ("info", 401)
    assert "Bearer ***" in str(requests[0]["message"])
    assert "YOUR_KEY" not in text


def test_workers_log_at_the_level_given(tmp_path: Path, mock_server: RunningServer) -> None:
    path = _routes(tmp_path, mock_server.url)
    log = tmp_path / "proxy.log"
    args = ("serve", "--config", str(path), "--workers", "2", "--log-level", "warning")
    with log.open("wb") as sink, sluicegate(*args, output=sink) as (_, url):
        body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
    events = [line["event"] for line in _json_lines(log.read_text())]
    assert events.count("open_proxy") == 2  # a warning, from each worker
    assert "ready" not in events
    assert "request" not in events


def test_a_traceback_is_redacted_once_it_is_text() -> None:
    """The redaction step runs after `exc_info` has become the traceback's text."""
    try:
        raise RuntimeError(f"the upstream said: Authorization: Bearer {UPSTREAM_KEY}")
    except RuntimeError as exc:
        event: Any = {"event": "unhandled_error", "exc_info": exc}
    for processor in PROCESSORS:
        event = processor(None, "error", event)
    assert "Traceback (most recent call last)" in event["exception"]
    assert "Authorization: Bearer ***" in event["exception"]
    assert UPSTREAM_KEY not in str(event)


def test_redaction_reaches_into_mappings_and_lists() -> None:
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}", "x-api-key": UPSTREAM_KEY, "a": "b"}
    event: Any = {
        "event": "e",
        "headers": headers,
        "seen": [{"cookie": "session=1"}, f"bearer {CLIENT_KEY}", 3],
        "token": CLIENT_KEY,
        "note": "nothing to hide",
    }
    assert redact(None, "info", event) == {
        "event": "e",
        "headers": {"Authorization": "***", "x-api-key": "***", "a": "b"},
        "seen": [{"cookie": "***"}, "bearer ***", 3],
        "token": "***",
        "note": "nothing to hide",
    }
    assert headers["x-api-key"] == UPSTREAM_KEY  # the caller's mapping is left as it was


def test_the_access_line_keeps_every_field_of_the_record() -> None:
    """Every field of `RequestRecord`, set, reaches the JSON line under its own name."""
    record = RequestRecord(
        request_id="req-7",
        status=200,
        route="bot",
        upstream="mock",
        model="mock-chat",
        stream=True,
        error="stream_cut",
        message="the upstream went away",
        stream_error="reset",
        client_disconnected=True,
        duration_s=1.5,
        ttft_s=0.25,
        usage=Usage(input=3, cached_input=2, output=5, reasoning=1, source="estimated"),
        cost_usd=0.01,
        attempts=[Attempt("mock", "mock-chat", "reset", 0.1), Attempt("mock", "mock-chat", "ok")],
        fallback_reason="reset",
        api="completions",
        key_name="app",
        should_retry=False,
    )
    unset = {f.name for f in fields(record) if getattr(record, f.name) is None}
    assert not unset, f"set {unset} above too"
    with capture_logs() as events:
        access_log(record)
    (event,) = events
    assert event.pop("event") == "request"
    assert event.pop("log_level") == "info"
    assert event == {f.name: getattr(record, f.name) for f in fields(record)}
    rendered = {"event": "request", **event}
    for processor in PROCESSORS:
        rendered = processor(None, "info", rendered)
    line = orjson.loads(JSONRenderer(serializer=orjson.dumps)(None, "info", rendered))
    assert line["usage"] == {
        "input": 3,
        "cached_input": 2,
        "output": 5,
        "reasoning": 1,
        "source": "estimated",
    }
    assert line["attempts"][0] == {
        "upstream": "mock",
        "model": "mock-chat",
        "outcome": "reset",
        "seconds": 0.1,
    }
    assert {f.name for f in fields(record)} | {"event", "level", "timestamp"} == line.keys()


def test_redaction_masks_str_subclasses_and_secret_names_every_time() -> None:
    """The flat-value fast path checks `type(value) is str`; a subclass of str (an enum's
    value, say) still goes through the general step, and a secret field name is masked on
    every line, not only the first (its verdict is cached)."""

    class Word(str):
        pass

    for _ in range(2):
        line = redact(None, "info", {"note": Word("Bearer sk-123"), "api_key": "sk-9", "n": 1})
        assert line == {"note": "Bearer ***", "api_key": "***", "n": 1}
