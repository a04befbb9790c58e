"""POST /v1/responses relayed natively: the real openai SDK through a real proxy to two mock
upstreams that speak the Responses API, stream and non-stream, tools and structured output;
first content, fallback, mid-stream errors, usage and cost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pydantic
import pytest

from proxy.app import create_app
from proxy.mock.content import expected_content
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY

ROUTES = """\
upstreams:
  a: {{base_url: "{a}/v1", api_key: "${{KEY}}"}}
  b: {{base_url: "{b}/v1"}}
  slow: {{base_url: "{slow}/v1"}}
  failing: {{base_url: "{failing}/v1"}}
routes:
  - model: bot
    targets: [{{upstream: a, model: mock-a}}]
  - model: bot-b
    targets: [{{upstream: b, model: mock-b}}]
  - model: hurried
    first_token_timeout: 0.4
    targets: [{{upstream: slow, model: mock-slow}}]
    fallbacks: [{{upstream: b, model: mock-b}}]
  - model: hedged
    hedge_after: 0.2
    targets: [{{upstream: slow, model: mock-slow}}]
    fallbacks: [{{upstream: b, model: mock-b}}]
  - model: failing
    targets: [{{upstream: failing, model: mock-f}}]
    fallbacks: [{{upstream: b, model: mock-b}}]
pricing:
  mock-a: {{input: 1.0, cached_input: 0.1, output: 2.0}}
"""


FAILED_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_f","object":"response","status":"in_progress","output":[]}}\n\n'
    b'event: response.failed\ndata: {"type":"response.failed","sequence_number":1,'
    b'"response":{"id":"resp_f","object":"response","status":"failed",'
    b'"error":{"code":"server_error","message":"overloaded"},"output":[]}}\n\n'
)


async def failing_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with a stream that fails before any content."""
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FAILED_STREAM})


class Mocks:
    def __init__(self) -> None:
        self.a, self.b = MockUpstream(faults=True), MockUpstream()
        self.slow = MockUpstream(Knobs(ttft=3.0, keepalives=3))


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[Mocks, dict[str, RunningServer]]]:
    apps = Mocks()
    with (
        RunningServer(apps.a) as a,
        RunningServer(apps.b) as b,
        RunningServer(apps.slow) as slow,
        RunningServer(failing_upstream) as failing,
    ):
        yield apps, {"a": a, "b": b, "slow": slow, "failing": failing}


@pytest.fixture(scope="module")
def proxy(
    mocks: tuple[Mocks, dict[str, RunningServer]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    servers = mocks[1]
    path = Path(tmp_path_factory.mktemp("responses")) / "routes.yaml"
    path.write_text(ROUTES.format(**{name: s.url for name, s in servers.items()}))
    with RunningServer(create_app(path, env={"KEY": UPSTREAM_KEY})) as server:
        yield server


@pytest.fixture(scope="module")
def client(proxy: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)


def test_non_stream_answers_the_upstreams_text_and_usage(
    client: openai.OpenAI, mocks: tuple[Mocks, dict[str, RunningServer]]
) -> None:
    response = client.responses.create(model="bot", input="双十一预售?", extra_body={"seed": 3})
    assert response.output_text == expected_content(3, 16)
    assert response.model == "mock-a"
    assert response.usage is not None
    record = mocks[0].a.records[-1]
    assert response.usage.input_tokens == record.prompt_tokens
    assert response.usage.output_tokens == record.completion_tokens == 16
    assert record.body["model"] == "mock-a"
    assert "stream_options" not in record.body
    assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_stream_events_arrive_in_order_and_end_completed(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(model="bot", input="hi", stream=True, extra_body={"seed": 5})
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected_content(5, 16)


def test_stream_helper_gives_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="bot", input="hi", extra_body={"seed": 9}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == expected_content(9, 16)
    assert final.usage is not None
    assert final.usage.output_tokens == 16


def test_function_tool_call_and_its_answer(client: openai.OpenAI) -> None:
    tools: list[Any] = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    first = client.responses.create(model="bot", input="weather in Paris?", tools=tools)
    call = first.output[0]
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert orjson.loads(call.arguments) == {"city": "mock"}
    second = client.responses.create(
        model="bot",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=tools,
    )
    assert second.output[0].type == "message"
    assert second.output_text


def test_streamed_function_call_arguments(client: openai.OpenAI) -> None:
    tools: list[Any] = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with client.responses.stream(model="bot", input="call f", tools=tools) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert final.output[0].type == "function_call"
    assert final.output[0].arguments == "{}"


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_structured_output_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="bot", input="weather?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="mock", celsius=1, sunny=True)


def test_first_token_timeout_falls_back_to_the_next_upstream(
    client: openai.OpenAI, mocks: tuple[Mocks, dict[str, RunningServer]]
) -> None:
    """The slow upstream sends keep-alive comments only: they are not content."""
    events = list(client.responses.create(model="hurried", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.model == "mock-b"
    assert mocks[0].slow.records, "the slow upstream was tried first"


def test_a_hedge_on_another_upstream_wins_when_the_first_is_slow(
    client: openai.OpenAI,
) -> None:
    with client.responses.stream(model="hedged", input="hi") as stream:
        final = stream.get_final_response()
    assert final.model == "mock-b"
    assert final.output_text


def test_a_response_failed_before_content_moves_on_to_the_next_candidate(
    client: openai.OpenAI,
) -> None:
    events = list(client.responses.create(model="failing", input="hi", stream=True))
    assert [e.type for e in events if e.type.endswith(".failed")] == []  # never relayed
    assert events[-1].type == "response.completed"
    assert events[-1].response.model == "mock-b"


def test_a_mid_stream_reset_ends_with_the_responses_error_event(
    client: openai.OpenAI, proxy: RunningServer
) -> None:
    body = {"model": "bot", "input": "hi", "stream": True, "fault": {"reset_after": 3}}
    events = list(client.responses.create(model="bot", input="hi", stream=True,
                                           extra_body={"fault": {"reset_after": 3}}))  # fmt: skip
    assert events[-1].type == "error"
    assert events[-1].code == "upstream_protocol_error"
    assert events[-1].sequence_number == events[-2].sequence_number + 1
    raw = httpx.post(proxy.url + "/v1/responses", json=body, timeout=10).content
    assert raw.endswith(b"\n\n")
    assert b"event: error\ndata: " in raw
    error = orjson.loads(raw.rsplit(b"data: ", 1)[1])
    assert set(error) == {"type", "code", "message", "param", "sequence_number"}


def test_the_stream_helper_sees_the_error_event_and_has_no_final_response(
    client: openai.OpenAI,
) -> None:
    """openai-python yields `event: error` as a ResponseErrorEvent (it does not raise)."""
    fault = {"fault": {"reset_after": 2}}
    with client.responses.stream(model="bot", input="hi", extra_body=fault) as stream:
        kinds = [event.type for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()
    assert kinds[-1] == "error"
    assert kinds.count("response.output_text.delta") == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"input": "hi"}', 400, None),
        (b'{"model": "nope", "input": "hi"}', 404, "model_not_found"),
        (b'{"model": "bot", "input": 3}', 400, None),
    ],
)
def test_bad_requests_get_the_same_errors_as_chat(
    proxy: RunningServer, body: bytes, status: int, code: str | None
) -> None:
    answer = httpx.post(
        proxy.url + "/v1/responses",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
