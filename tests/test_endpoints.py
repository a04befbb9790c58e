"""/v1/completions and /v1/embeddings: routed, relayed and metered like chat, through the
real openai SDK, with /metrics equal to the mock upstream's ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.mock.content import EMBEDDING_DIMENSIONS, count_input_tokens, expected_content
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import wait_for
from tests.test_metering_e2e import scrape, total

PRICE = {"input": 0.5, "output": 1.5}  # USD per million tokens


@pytest.fixture
def setup(
    tmp_path: Path,
    mock_app: MockUpstream,
    mock_server: RunningServer,
    picky: tuple[MockUpstream, RunningServer],
    dead_port: int,
) -> Iterator[tuple[RunningServer, list[RequestRecord], MockUpstream, MockUpstream]]:
    picky_app, picky_server = picky
    path = tmp_path / "routes.yaml"
    path.write_text(f"""\
upstreams:
  mock: {{base_url: '{mock_server.url}/v1'}}
  verbatim: {{base_url: '{mock_server.url}/v1', stream_options: pass}}
  picky:
    base_url: '{picky_server.url}/v1'
    stream_options: strip
    usage_headers: {{prompt_tokens: x-prompt-tokens, completion_tokens: x-completion-tokens}}
  dead: {{base_url: 'http://127.0.0.1:{dead_port}/v1', timeouts: {{connect: 1}}}}
routes:
  - {{model: writer, targets: [{{upstream: mock, model: mock-instruct}}]}}
  - {{model: writer-verbatim, targets: [{{upstream: verbatim, model: mock-instruct}}]}}
  - {{model: writer-picky, targets: [{{upstream: picky, model: mock-instruct}}]}}
  - model: embedder
    targets: [{{upstream: dead, model: mock-embed}}]
    fallbacks: [{{upstream: mock, model: mock-embed}}]
pricing:
  mock-instruct: {{input: {PRICE["input"]}, output: {PRICE["output"]}}}
  mock-embed: {{input: {PRICE["input"]}, output: {PRICE["output"]}}}
""")
    finished: list[RequestRecord] = []
    app = create_app(path, env={}, watch_interval=None, observers=(finished.append,))
    with RunningServer(app) as proxy:
        yield proxy, finished, mock_app, picky_app


def _client(proxy: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)


MOCK = {"mock": {"tokens": 7, "delay": 0}}
PROMPT = "双十一 的 优惠 是 什么"


def test_completions_non_stream_and_stream_relay_the_upstreams_text(setup: Any) -> None:
    proxy, finished, mock_app, _ = setup
    client = _client(proxy)
    want = expected_content(0, 7)
    seen = len(mock_app.records)
    whole = client.completions.create(model="writer", prompt=PROMPT, extra_body=MOCK)
    assert whole.choices[0].text == want
    assert whole.model == "mock-instruct"  # the upstream's answer, unchanged
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == count_input_tokens(PROMPT)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="writer", prompt=PROMPT, stream=True, extra_body=MOCK
        )
        if c.choices
    ]
    assert "".join(pieces) == want
    assert len([p for p in pieces if p]) == 7
    # Upstream got /v1/completions with the target's model name.
    sent = mock_app.records[seen:]
    assert [r.body["model"] for r in sent] == ["mock-instruct", "mock-instruct"]
    assert all("prompt" in r.body and "messages" not in r.body for r in sent)
    assert wait_for(lambda: len(finished) == 2)
    assert [r.api for r in finished] == ["completions", "completions"]


@pytest.mark.parametrize("route", ["writer", "writer-verbatim", "writer-picky"])
def test_completions_streams_are_metered_to_the_upstreams_ground_truth(
    setup: Any, route: str
) -> None:
    """auto (usage asked for, then dropped), pass (the client asked) and strip (usage from
    headers): the counters equal what the mock billed, token for token and cent for cent."""
    proxy, finished, mock_app, picky_app = setup
    upstream = picky_app if route == "writer-picky" else mock_app
    seen = len(upstream.records)
    client = _client(proxy)
    options = {"include_usage": True} if route != "writer" else None
    chunks = list(
        client.completions.create(
            model=route,
            prompt=[PROMPT, "the deal"],
            stream=True,
            extra_body=MOCK,
            **({"stream_options": options} if options else {}),  # type: ignore[arg-type]
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if options else 0)
    assert wait_for(lambda: len(finished) == 1)
    billed = upstream.records[seen:]
    prompt = sum(r.prompt_tokens for r in billed)
    completion = sum(r.completion_tokens for r in billed)
    assert (prompt, completion) == (count_input_tokens([PROMPT, "the deal"]), 7)
    if options:
        got = usage_chunks[0].usage
        assert got is not None
        assert (got.prompt_tokens, got.completion_tokens) == (prompt, 7)
    samples = scrape(proxy.url)
    tokens = "sluicegate_tokens_total"
    assert total(samples, tokens, route=route, type="input") == prompt
    assert total(samples, tokens, route=route, type="output") == completion
    source = "header" if route == "writer-picky" else "reported"
    assert total(samples, tokens, route=route, usage_source=source) == prompt + completion
    cost = (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6
    assert total(samples, "sluicegate_cost_usd_total", route=route) == pytest.approx(cost)


def test_embeddings_are_routed_with_fallback_and_metered(setup: Any) -> None:
    proxy, finished, mock_app, _ = setup
    seen = len(mock_app.records)
    inputs = ["购物车 里 的 东西", "the price today"]
    result = _client(proxy).embeddings.create(
        model="embedder", input=inputs, encoding_format="float"
    )
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == EMBEDDING_DIMENSIONS for d in result.data)
    assert result.usage.prompt_tokens == count_input_tokens(inputs)
    assert wait_for(lambda: len(finished) == 1)
    record = finished[0]
    assert (record.api, record.upstream, record.model) == ("embeddings", "mock", "mock-embed")
    assert [a.outcome for a in record.attempts] == ["connect_error", "ok"]
    billed = mock_app.records[seen:]
    assert sum(r.prompt_tokens for r in billed) == count_input_tokens(inputs)
    samples = scrape(proxy.url)
    tokens = "sluicegate_tokens_total"
    assert total(samples, tokens, route="embedder", type="input") == count_input_tokens(inputs)
    assert total(samples, tokens, route="embedder", type="output") == 0
    fallbacks = total(samples, "sluicegate_fallbacks_total", route="embedder")
    assert fallbacks == 1
    cost = count_input_tokens(inputs) * PRICE["input"] / 1e6
    assert total(samples, "sluicegate_cost_usd_total", route="embedder") == pytest.approx(cost)


def test_embeddings_ignore_stream_and_token_arrays_count_exactly(setup: Any) -> None:
    proxy, finished, _, _ = setup
    r = httpx.post(
        proxy.url + "/v1/embeddings",
        json={"model": "embedder", "input": [[1, 2, 3, 4]], "stream": True},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["usage"]["prompt_tokens"] == 4
    assert wait_for(lambda: len(finished) == 1)
    assert finished[0].usage is not None
    assert finished[0].usage.input == 4


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "writer"}, "prompt"),
        ("/v1/completions", {"model": "writer", "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": "writer", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "writer", "prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/embeddings", {"model": "embedder", "input": {"a": 1}}, "input"),
        ("/v1/embeddings", {"input": "x"}, "model"),
    ],
)
def test_bad_requests_name_the_parameter(
    setup: Any, path: str, body: dict[str, Any], param: str
) -> None:
    proxy, _, _, _ = setup
    r = httpx.post(proxy.url + path, json=body, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_an_unknown_model_is_404_on_every_api(setup: Any) -> None:
    proxy, _, _, _ = setup
    client = _client(proxy)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_json_answer_to_a_completions_stream_becomes_text_completion_chunks(setup: Any) -> None:
    """An upstream that answers `stream: true` with one JSON body: the client still gets the
    completions API's stream shape, and the text and usage are the upstream's."""
    proxy, finished, _, _ = setup
    knobs = {"mock": {**MOCK["mock"], "json_for_stream": True}}
    chunks = list(
        _client(proxy).completions.create(
            model="writer-verbatim",
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=knobs,
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_content(0, 7)
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == ["stop"]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 7
    assert wait_for(lambda: len(finished) == 1)
    assert finished[0].usage is not None
    assert finished[0].usage.output == 7
