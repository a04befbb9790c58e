"""POST /v1/responses through `responses: chat` upstreams: the real openai SDK, the Agents
SDK, LangChain (`use_responses_api=True`) and the Vercel AI SDK through a real proxy to the
mock's chat completions endpoint, stream and non-stream, tools and structured output; the chat
request the upstream got; usage and cost exact against the mock's counts; fallback between
chat and native upstreams; refusals naming the parameter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from proxy.app import create_app
from proxy.mock.content import expected_content
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.record import RequestRecord, Usage
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY
from tests.helpers import wait_for
from tests.responses_checks import (
    WEATHER,
    check_stream,
    events_of,
    langchain_on_responses,
    run_weather_agent,
)
from tests.test_openai_node import run_node

REASONING, CACHED, TOKENS = 3, 4, 8
ROUTES = """\
upstreams:
  deepseek: {{base_url: "{deepseek}/v1", api_key: "${{KEY}}", responses: chat}}
  native: {{base_url: "{native}/v1"}}
  broken: {{base_url: "{broken}/v1"}}
  cutting: {{base_url: "{cutting}/v1", responses: chat}}
  slow: {{base_url: "{slow}/v1", responses: chat}}
  down: {{base_url: "http://127.0.0.1:9/v1", responses: chat}}
  jsony: {{base_url: "{jsony}/v1", responses: chat}}
routes:
  - model: ds
    targets: [{{upstream: deepseek, model: mock-ds}}]
  - model: chat-then-native
    targets: [{{upstream: deepseek, model: mock-ds}}]
    fallbacks: [{{upstream: native, model: mock-native}}]
  - model: down-then-native
    targets: [{{upstream: down, model: mock-ds}}]
    fallbacks: [{{upstream: native, model: mock-native}}]
  - model: broken-then-chat
    targets: [{{upstream: broken, model: mock-native}}]
    fallbacks: [{{upstream: deepseek, model: mock-ds}}]
  - model: whole
    targets: [{{upstream: jsony, model: mock-ds}}]
  - model: cut
    targets: [{{upstream: cutting, model: mock-ds}}]
  - model: hurried
    first_token_timeout: 0.4
    targets: [{{upstream: slow, model: mock-ds}}]
    fallbacks: [{{upstream: deepseek, model: mock-ds}}]
pricing:
  mock-ds: {{input: 2.0, cached_input: 0.5, output: 8.0}}
"""


class Setup:
    def __init__(self) -> None:
        self.deepseek = MockUpstream(
            Knobs(tokens=TOKENS, reasoning=REASONING, cached_tokens=CACHED)
        )
        self.native, self.broken = MockUpstream(), MockUpstream(Knobs(status=500))
        self.cutting = MockUpstream(Knobs(reset_after=3))
        self.slow = MockUpstream(Knobs(ttft=3.0))
        self.jsony = MockUpstream(Knobs(tokens=TOKENS, json_for_stream=True))
        self.records: list[RequestRecord] = []
        self.proxy: RunningServer | None = None
        self.url = ""

    def finished(self, seen: int) -> RequestRecord:
        assert wait_for(lambda: len(self.records) > seen)
        return self.records[-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup()
    names = ("deepseek", "native", "broken", "cutting", "slow", "jsony")
    with (
        RunningServer(s.deepseek) as deepseek,
        RunningServer(s.native) as native,
        RunningServer(s.broken) as broken,
        RunningServer(s.cutting) as cutting,
        RunningServer(s.slow) as slow,
        RunningServer(s.jsony) as jsony,
    ):
        running = (deepseek, native, broken, cutting, slow, jsony)
        servers = dict(zip(names, running, strict=True))
        path = Path(tmp_path_factory.mktemp("translated")) / "routes.yaml"
        path.write_text(ROUTES.format(**{name: server.url for name, server in servers.items()}))
        app = create_app(
            path, env={"KEY": UPSTREAM_KEY}, watch_interval=None, observers=(s.records.append,)
        )
        with RunningServer(app) as proxy:
            s.proxy, s.url = proxy, proxy.url
            yield s


@pytest.fixture(scope="module")
def client(setup: Setup) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=setup.url + "/v1", api_key="client-key", max_retries=0) as client:
        yield client


def _usage_is_the_mocks(setup: Setup, record: RequestRecord, usage: Any) -> None:
    sent = setup.deepseek.records[-1]
    assert (usage.input_tokens, usage.output_tokens) == (sent.prompt_tokens, sent.completion_tokens)
    assert usage.input_tokens_details.cached_tokens == CACHED
    assert usage.output_tokens_details.reasoning_tokens == REASONING
    assert record.usage == Usage(
        input=sent.prompt_tokens - CACHED,
        cached_input=CACHED,
        output=sent.completion_tokens - REASONING,
        reasoning=REASONING,
    )
    cost = ((sent.prompt_tokens - CACHED) * 2.0 + CACHED * 0.5 + sent.completion_tokens * 8.0) / 1e6
    assert record.cost_usd == pytest.approx(cost)
    assert (record.api, record.upstream, record.model) == ("responses", "deepseek", "mock-ds")


def test_non_stream_text_reasoning_and_exact_usage(client: openai.OpenAI, setup: Setup) -> None:
    seen = len(setup.records)
    response = client.responses.create(
        model="ds", input="双十一 有哪些 优惠?", instructions="Be brief.", max_output_tokens=50
    )
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == expected_content(0, TOKENS - REASONING)
    assert response.id.startswith("resp_")
    assert response.instructions == "Be brief."
    chat = setup.deepseek.records[-1].body
    assert chat["model"] == "mock-ds"
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "双十一 有哪些 优惠?"},
    ]
    assert chat["max_tokens"] == 50
    assert "input" not in chat
    assert setup.deepseek.records[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    _usage_is_the_mocks(setup, setup.finished(seen), response.usage)


def test_stream_events_and_exact_usage(client: openai.OpenAI, setup: Setup) -> None:
    seen = len(setup.records)
    with client.responses.stream(model="ds", input="hi") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == expected_content(0, TOKENS - REASONING)
    assert [item.type for item in final.output] == ["reasoning", "message"]
    chat = setup.deepseek.records[-1].body
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    _usage_is_the_mocks(setup, setup.finished(seen), final.usage)


def test_the_translated_stream_is_valid_to_the_byte(setup: Setup) -> None:
    """What the proxy writes itself: every event valid for openai-python, in order, ids and
    sequence numbers consistent, nothing of the chat stream left in it."""
    body = {"model": "ds", "input": "hi", "stream": True, "tools": [WEATHER]}
    answer = httpx.post(setup.url + "/v1/responses", json=body, timeout=10)
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert b"chat.completion.chunk" not in answer.content
    assert b"[DONE]" not in answer.content
    response = check_stream(events_of(answer.content))
    assert response is not None
    assert [item.type for item in response.output] == ["reasoning", "function_call"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_tool_round_trip(client: openai.OpenAI, setup: Setup, stream: bool) -> None:
    def ask(items: list[Any]) -> Any:
        if not stream:
            return client.responses.create(model="ds", input=items, tools=[WEATHER])
        with client.responses.stream(model="ds", input=items, tools=[WEATHER]) as events:
            return events.get_final_response()

    question: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = ask(question)
    call = first.output[-1]
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.call_id) == (
        "get_weather",
        '{"city":"mock"}',
        "call_mock0",
    )
    assert setup.deepseek.records[-1].body["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    second = ask(
        [*question, *[item.model_dump(exclude_none=True) for item in first.output], result]
    )
    assert second.output_text == expected_content(0, TOKENS - REASONING)
    messages = setup.deepseek.records[-1].body["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_mock0"
    assert messages[-2]["reasoning_content"]  # back inside the tool loop, for DeepSeek
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_mock0", "content": "sunny"}


class Deal(pydantic.BaseModel):
    item: str
    percent_off: int


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_parses(client: openai.OpenAI, setup: Setup, stream: bool) -> None:
    if stream:
        with client.responses.stream(model="ds", input="a deal", text_format=Deal) as events:
            parsed = events.get_final_response().output_parsed
    else:
        parsed = client.responses.parse(model="ds", input="a deal", text_format=Deal).output_parsed
    assert parsed == Deal(item="mock", percent_off=1)
    response_format = setup.deepseek.records[-1].body["response_format"]
    assert (response_format["type"], response_format["json_schema"]["name"]) == (
        "json_schema",
        "Deal",
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_elsewhere"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
    ],
    ids=["previous-response-id", "web-search", "background", "include"],
)
def test_what_cannot_be_translated_is_a_400_naming_it(
    client: openai.OpenAI, setup: Setup, extra: dict[str, Any], param: str
) -> None:
    sent = len(setup.deepseek.records)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="ds", input="hi", **extra)
    assert (refused.value.param, refused.value.code) == (param, "unsupported_parameter")  # type: ignore[attr-defined]
    assert len(setup.deepseek.records) == sent  # the upstream never saw it


def test_an_untranslatable_request_goes_to_a_native_fallback(
    client: openai.OpenAI, setup: Setup
) -> None:
    seen = len(setup.records)
    response = client.responses.create(
        model="chat-then-native", input="hi", tools=[{"type": "web_search"}]
    )
    assert response.output_text
    record = setup.finished(seen)
    assert [a.outcome for a in record.attempts] == ["untranslatable", "ok"]
    assert record.upstream == "native"


@pytest.mark.parametrize(
    ("route", "first"), [("down-then-native", "connect_error"), ("broken-then-chat", "status_5xx")]
)
def test_fallback_between_chat_and_native_upstreams(
    client: openai.OpenAI, setup: Setup, route: str, first: str
) -> None:
    seen = len(setup.records)
    with client.responses.stream(model=route, input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text
    record = setup.finished(seen)
    assert [a.outcome for a in record.attempts] == [first, "ok"]


def test_first_token_timeout_falls_back_as_for_chat(client: openai.OpenAI, setup: Setup) -> None:
    seen = len(setup.records)
    with client.responses.stream(model="hurried", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == expected_content(0, TOKENS - REASONING)
    assert [a.outcome for a in setup.finished(seen).attempts] == ["first_token_timeout", "ok"]


def test_a_whole_answer_to_a_stream_request_is_streamed_with_its_usage(
    client: openai.OpenAI, setup: Setup
) -> None:
    """An upstream that answers JSON to `stream: true`: the client still gets a Responses
    stream, its `response.completed` carrying the answer's usage."""
    with client.responses.stream(model="whole", input="hi") as stream:
        final = stream.get_final_response()
    sent = setup.jsony.records[-1]
    assert final.output_text == expected_content(0, TOKENS)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        sent.prompt_tokens,
        sent.completion_tokens,
    )


def test_a_cut_stream_ends_with_the_responses_error_event(setup: Setup) -> None:
    seen = len(setup.records)
    body = {"model": "cut", "input": "hi", "stream": True}
    answer = httpx.post(setup.url + "/v1/responses", json=body, timeout=10)
    events = events_of(answer.content)
    assert check_stream(events) is None  # consistent up to its end: the error event
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "upstream_protocol_error"
    record = setup.finished(seen)
    assert record.stream_error == "reset"
    assert record.usage is not None
    assert record.usage.source == "estimated"


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_runs_a_tool_round_trip(setup: Setup, streamed: bool) -> None:
    sent = len(setup.deepseek.records)
    result = run_weather_agent(setup.url, "ds", streamed=streamed)
    assert result.final_output == expected_content(0, TOKENS - REASONING)
    first, second = (r.body for r in setup.deepseek.records[sent:])
    assert first["messages"][0] == {"role": "system", "content": "Answer with the tool."}
    tool = {"role": "tool", "tool_call_id": "call_mock0", "content": "sunny in mock"}
    assert second["messages"][-1] == tool


def test_langchain_with_the_responses_api_invokes_and_streams(setup: Setup) -> None:
    llm = langchain_on_responses(setup.url, "ds")
    answer = llm.invoke("双十一预售什么时候开始?")
    assert answer.text == expected_content(0, TOKENS - REASONING)
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == setup.deepseek.records[-1].completion_tokens
    streamed = "".join(chunk.text for chunk in llm.stream("双十一预售什么时候开始?"))
    assert streamed == expected_content(0, TOKENS - REASONING)
    assert "messages" in setup.deepseek.records[-1].body  # chat completions upstream


def test_a_translated_response_is_not_stored_and_the_404_says_so(client: openai.OpenAI) -> None:
    response = client.responses.create(model="ds", input="hi")
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve(response.id)
    assert "translated" in missing.value.message
    assert "not stored" in missing.value.message


def test_vercel_ai_sdk_default_provider(setup: Setup) -> None:
    """`openai(model)` from @ai-sdk/openai speaks the Responses API: generateText and
    streamText (openai-node's own `responses.create` sends `seed`, which is refused here)."""
    assert setup.proxy is not None
    sent = len(setup.deepseek.records)
    answer = run_node("ai-sdk.mjs", setup.proxy, 0, model="ds")
    want = expected_content(0, TOKENS - REASONING)
    assert answer["non_stream"] == answer["stream"] == want
    assert answer["non_stream_output_tokens"] == answer["stream_output_tokens"] == TOKENS
    assert answer["finish"] == "stop"
    assert ["messages" in r.body for r in setup.deepseek.records[sent:]] == [True, True]
