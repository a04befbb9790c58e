"""The access log: one JSON line per request with what operators need, and never a secret."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai

from proxy.mock_upstream import MockUpstream
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
