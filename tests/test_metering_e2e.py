"""The numbers add up: /metrics after real traffic equals the mock upstream's ground truth,
token for token and cent for cent, in one process and across four workers."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.mock.upstream import MockUpstream, RequestRecord
from proxy.serving import RunningServer
from tests.helpers import sluicegate, wait_for

ROOT = Path(__file__).resolve().parent.parent
PRICE_IN, PRICE_OUT = 0.28, 0.42  # USD per million tokens for mock-chat
MESSAGES = [{"role": "user", "content": "双十一 有哪些 优惠 活动?"}]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url + "/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def truth(records: list[RequestRecord]) -> tuple[int, int]:
    """Prompt and completion tokens the mock actually billed (answered requests)."""
    answered = [r for r in records if r.completion_tokens]
    return sum(r.prompt_tokens for r in answered), sum(r.completion_tokens for r in answered)


def _routes(mock_url: str, picky_url: str, dead_port: int) -> str:
    return f"""\
upstreams:
  mock: {{base_url: '{mock_url}/v1'}}
  picky:
    base_url: '{picky_url}/v1'
    usage_headers: {{prompt_tokens: x-prompt-tokens, completion_tokens: x-completion-tokens}}
  dead: {{base_url: 'http://127.0.0.1:{dead_port}/v1'}}
routes:
  - {{model: bot, targets: [{{upstream: mock, model: mock-chat}}]}}
  - {{model: stripped, targets: [{{upstream: picky, model: mock-chat}}]}}
  - model: rescued
    targets: [{{upstream: dead, model: mock-chat}}]
    fallbacks: [{{upstream: mock, model: mock-chat}}]
pricing:
  mock-chat: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
"""


def _traffic(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    for i in range(3):
        knobs = {"mock": {"tokens": 5 + i, "delay": 0}}
        client.chat.completions.create(model="bot", messages=MESSAGES, extra_body=knobs)  # type: ignore[arg-type]
        for _chunk in client.chat.completions.create(  # the SDK's default: no include_usage
            model="bot",
            messages=MESSAGES,
            stream=True,
            extra_body=knobs,  # type: ignore[arg-type]
        ):
            pass
        usage_chunks = [
            c
            for c in client.chat.completions.create(
                model="stripped",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                extra_body=knobs,
            )
            if c.usage is not None
        ]
        assert len(usage_chunks) == 1
        client.chat.completions.create(model="rescued", messages=MESSAGES, extra_body=knobs)  # type: ignore[arg-type]


def test_counters_equal_the_upstreams_ground_truth(
    tmp_path: Path,
    mock_app: MockUpstream,
    mock_server: RunningServer,
    picky: tuple[MockUpstream, RunningServer],
    dead_port: int,
) -> None:
    picky_app, picky_server = picky
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url, picky_server.url, dead_port))
    seen_mock, seen_picky = len(mock_app.records), len(picky_app.records)
    finished: list[object] = []
    app = create_app(path, env={}, watch_interval=None, observers=(finished.append,))
    with RunningServer(app) as proxy:
        _traffic(proxy.url)
        assert wait_for(lambda: len(finished) == 12)
        samples = scrape(proxy.url)
    prompt, completion = truth(mock_app.records[seen_mock:] + picky_app.records[seen_picky:])
    tokens = "sluicegate_tokens_total"
    assert (
        total(samples, tokens, type="input") + total(samples, tokens, type="cached_input") == prompt
    )
    assert (
        total(samples, tokens, type="output") + total(samples, tokens, type="reasoning")
        == completion
    )
    assert total(samples, tokens, usage_source="estimated") == 0
    assert total(samples, tokens, route="stripped", usage_source="header") > 0
    cost = (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6
    assert total(samples, "sluicegate_cost_usd_total") == pytest.approx(cost, abs=1e-12)
    assert total(samples, "sluicegate_requests_total", status="200") == 12
    assert total(samples, "sluicegate_fallbacks_total", route="rescued", to_upstream="mock") == 3
    assert total(samples, "sluicegate_inflight_requests") == 0


def test_unknown_models_add_no_series(proxy: RunningServer) -> None:
    body = {"messages": MESSAGES}
    httpx.post(proxy.url + "/v1/chat/completions", json={**body, "model": "warm-up"})
    before = len(scrape(proxy.url))
    with httpx.Client(base_url=proxy.url) as client:
        for i in range(10_000):
            r = client.post("/v1/chat/completions", json={**body, "model": f"model-{i}"})
            assert r.status_code == 404
    after = scrape(proxy.url)
    assert len(after) == before
    assert total(after, "sluicegate_requests_total", route="_unknown", status="404") >= 10_000


def test_four_workers_report_the_same_totals(
    tmp_path: Path,
    mock_app: MockUpstream,
    mock_server: RunningServer,
    picky: tuple[MockUpstream, RunningServer],
    dead_port: int,
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url, picky[1].url, dead_port))
    with sluicegate("serve", "--config", str(path), "--workers", "4", "--no-watch") as (
        _,
        url,
    ):
        seen = len(mock_app.records)
        body = {"model": "bot", "messages": MESSAGES, "mock": {"tokens": 7, "delay": 0}}
        for _ in range(40):  # fresh connections, so the kernel spreads them over the workers
            assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        assert wait_for(lambda: len(mock_app.records) >= seen + 40)
        prompt, completion = truth(mock_app.records[seen:])

        def settled() -> bool:
            return total(scrape(url), "sluicegate_requests_total", route="bot") == 40

        assert wait_for(settled)
        for _ in range(8):  # whichever worker answers, the totals are the sum of all
            samples = scrape(url)
            assert total(samples, "sluicegate_requests_total", route="bot") == 40
            assert total(samples, "sluicegate_tokens_total", type="output") == completion
            assert total(samples, "sluicegate_tokens_total", type="input") == prompt
