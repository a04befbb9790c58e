"""Clients that leave mid-answer. With `server.finish_after_abort` the proxy reads the answer
to its end (sending it nowhere), so the counters equal the upstream's bill exactly; by default
it closes the upstream at once and counts an estimate, marked `usage_source="estimated"`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from proxy.admission import hash_key
from proxy.app import create_app
from proxy.config import Price, parse_config
from proxy.metering.cost import cost_usd
from proxy.mock.upstream import MockUpstream
from proxy.mock.upstream import RequestRecord as MockRecord
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import sluicegate, wait_for
from tests.test_metering_e2e import MESSAGES, PRICE_IN, PRICE_OUT, scrape, total

SLOW = {"mock": {"tokens": 40, "delay": 0.02, "ttft": 0.05}}  # ~0.85 s per answer


def _routes(mock_url: str, picky_url: str, finish: str) -> str:
    return f"""\
server: {{finish_after_abort: {finish}}}
upstreams:
  mock: {{base_url: '{mock_url}/v1'}}
  verbatim: {{base_url: '{mock_url}/v1', stream_options: pass}}
  picky:
    base_url: '{picky_url}/v1'
    usage_headers: {{prompt_tokens: x-prompt-tokens, completion_tokens: x-completion-tokens}}
routes:
  - {{model: auto, targets: [{{upstream: mock, model: mock-chat}}]}}
  - {{model: verbatim, targets: [{{upstream: verbatim, model: mock-chat}}]}}
  - {{model: stripped, targets: [{{upstream: picky, model: mock-chat}}]}}
pricing:
  mock-chat: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
"""


def _abort_stream(url: str, model: str, after: int = 3, key: str = "k", **extra: Any) -> int:
    """Reads `after` chunks of a streamed answer, then hangs up; returns chunks read."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, extra_body=SLOW, **extra
    )
    read = 0
    for _ in stream:
        read += 1
        if read == after:
            break
    stream.close()
    return read


def _abort_plain(url: str, model: str) -> None:
    """A non-stream request whose client gives up before the answer comes."""
    body = {"model": model, "messages": MESSAGES, **SLOW}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.2))


def _billed(records: list[MockRecord]) -> tuple[int, int]:
    """What the upstream generated: prompt tokens, and the content tokens it actually sent."""
    return sum(r.prompt_tokens for r in records), sum(r.sent_tokens for r in records)


@pytest.fixture
def proxies(
    tmp_path: Path, mock_server: RunningServer, picky: tuple[MockUpstream, RunningServer]
) -> Iterator[Any]:
    started = []

    def start(finish: str) -> tuple[RunningServer, list[RequestRecord]]:
        path = tmp_path / f"routes-{finish}.yaml"
        path.write_text(_routes(mock_server.url, picky[1].url, finish))
        finished: list[RequestRecord] = []
        app = create_app(path, env={}, watch_interval=None, observers=(finished.append,))
        server = RunningServer(app).start()
        started.append(server)
        return server, finished

    yield start
    for server in started:
        server.stop()


def test_finished_after_abort_the_counters_equal_the_upstreams_bill(
    proxies: Any, mock_app: MockUpstream, picky: tuple[MockUpstream, RunningServer]
) -> None:
    proxy, finished = proxies("10")
    seen_mock, seen_picky = len(mock_app.records), len(picky[0].records)
    _abort_stream(proxy.url, "auto")  # usage asked for by the proxy, then dropped
    _abort_stream(proxy.url, "verbatim", stream_options={"include_usage": True})
    _abort_stream(proxy.url, "stripped")  # usage from the upstream's headers
    _abort_plain(proxy.url, "auto")
    assert wait_for(lambda: len(finished) == 4, 15)
    assert all(r.client_disconnected for r in finished)
    records = mock_app.records[seen_mock:] + picky[0].records[seen_picky:]
    assert all(r.finished is not None and r.disconnected is None for r in records)
    prompt, completion = _billed(records)
    assert completion == 4 * 40  # every answer ran to its end upstream
    samples = scrape(proxy.url)
    tokens = "sluicegate_tokens_total"
    assert total(samples, tokens, type="input") == prompt
    assert total(samples, tokens, type="output") == completion
    assert total(samples, tokens, usage_source="estimated") == 0
    cost = (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6
    assert total(samples, "sluicegate_cost_usd_total") == pytest.approx(cost, abs=1e-12)


def test_by_default_the_upstream_is_closed_at_once_and_usage_estimated(
    proxies: Any, mock_app: MockUpstream
) -> None:
    proxy, finished = proxies("null")
    seen = len(mock_app.records)
    read = _abort_stream(proxy.url, "auto", after=5)
    assert wait_for(lambda: len(finished) == 1)
    record = finished[0]
    assert record.client_disconnected
    assert wait_for(lambda: mock_app.records[seen].disconnected is not None)
    sent = mock_app.records[seen].sent_tokens
    assert sent < 40  # generation stopped early: the upstream saw the hang-up
    assert record.usage is not None
    assert record.usage.source == "estimated"
    # One token per relayed event: at least what the client read (less the role event), at
    # most what the upstream sent.
    assert read - 1 <= record.usage.output <= sent
    assert record.usage.input > 0


def test_an_estimated_abort_is_priced_and_charged_to_the_keys_budget(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    """It used to count as unpriced tokens (`unpriced_model` logged for a priced model): the
    relay's cancellation skipped the pricing. A budget must charge what the abort cost."""
    key = "sk-sg-" + "YWJvcnRlZF9zdHJlYW1zX2FyZV9wcmljZWQ"
    path = tmp_path / "routes.yaml"
    keys = f"keys:\n  leaver: {{sha256: '{hash_key(key)}', budget: {{usd: 1, period: day}}}}\n"
    path.write_text(_routes(mock_server.url, mock_server.url, "null") + keys)
    finished: list[RequestRecord] = []
    app = create_app(path, env={}, watch_interval=None, observers=(finished.append,))
    with capture_logs() as logs, RunningServer(app) as proxy:
        _abort_stream(proxy.url, "auto", after=5, key=key)
        assert wait_for(lambda: len(finished) == 1)
        samples = scrape(proxy.url)
    record = finished[0]
    assert record.usage is not None
    assert record.usage.source == "estimated"
    assert record.cost_usd == cost_usd(record.usage, Price(PRICE_IN, PRICE_OUT, PRICE_IN))
    assert record.cost_usd is not None
    assert record.cost_usd > 0
    assert total(samples, "sluicegate_unpriced_tokens_total") == 0
    assert total(samples, "sluicegate_cost_usd_total", key="leaver") == record.cost_usd
    assert not [e for e in logs if e["event"] == "unpriced_model"]
    store = app.state.runtime.store
    spent = asyncio.run(store.spend([parse_config(path.read_text(), "r", {}).keys[0]]))
    assert spent["leaver"] == pytest.approx(record.cost_usd, abs=1e-6)  # whole micro-dollars


def test_a_grace_shorter_than_the_answer_still_closes_the_upstream(
    proxies: Any, mock_app: MockUpstream
) -> None:
    proxy, finished = proxies("0.2")
    seen = len(mock_app.records)
    _abort_stream(proxy.url, "auto", after=2)
    assert wait_for(lambda: len(finished) == 1)
    assert wait_for(lambda: mock_app.records[seen].disconnected is not None)
    assert finished[0].usage is not None
    assert finished[0].usage.source == "estimated"


def test_four_workers_finish_aborted_answers_exactly(
    tmp_path: Path,
    mock_app: MockUpstream,
    mock_server: RunningServer,
    picky: tuple[MockUpstream, RunningServer],
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url, picky[1].url, "10"))
    with sluicegate("serve", "--config", str(path), "--workers", "4", "--no-watch") as (_, url):
        seen = len(mock_app.records)
        for _ in range(8):
            _abort_stream(url, "auto")
        assert wait_for(lambda: len(mock_app.records) >= seen + 8)
        records = mock_app.records[seen:]
        assert wait_for(lambda: all(r.finished is not None for r in records), 15)
        prompt, completion = _billed(records)

        def counted() -> bool:
            samples = scrape(url)
            return total(samples, "sluicegate_tokens_total", type="output") == completion

        assert wait_for(counted, 15)
        samples = scrape(url)
        assert total(samples, "sluicegate_tokens_total", type="input") == prompt
        assert total(samples, "sluicegate_requests_total", route="auto") == 8
