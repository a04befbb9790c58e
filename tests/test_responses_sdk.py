"""The translation read by the real clients: openai-python's `responses.create`, its stream
accumulator (`responses.stream` → `get_final_response`), structured output parsing, and the
Agents SDK's `Runner` with a function-tool round trip, against a loopback server that answers
`/v1/responses` by translating to chat, running a scripted chat model, and translating back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from pydantic import BaseModel

from proxy.errors import ProxyError
from proxy.responses import Shell, StreamTranslator, response_from_chat, translate_request
from proxy.serving import RunningServer
from tests.responses_checks import WEATHER, check_stream, events_of, run_weather_agent

USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 9,
    "total_tokens": 39,
    "prompt_cache_hit_tokens": 16,
}


class Answer(BaseModel):
    city: str
    degrees: int


def chat_model(chat: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A scripted model: structured output when asked, a tool call while it has no tool
    result, then an answer quoting the result."""
    last = chat["messages"][-1]
    if "response_format" in chat:
        return {"content": '{"city": "Paris", "degrees": 21}'}, "stop"
    if chat.get("tools") and last["role"] != "tool":
        calls = [
            {
                "id": "call_w1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ]
        return {
            "content": None,
            "reasoning_content": "I need the weather.",
            "tool_calls": calls,
        }, "tool_calls"
    if last["role"] == "tool":
        return {"content": f"The weather: {last['content']}."}, "stop"
    return {"content": "Hello there!", "reasoning_content": "A greeting."}, "stop"


def chunks_of(message: dict[str, Any], finish: str) -> Iterator[dict[str, Any]]:
    """The chat stream of `message`, split the way servers split it: a role chunk, pieces of
    reasoning, text and arguments, the finish, then usage."""
    head = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1738000000,
        "model": "up-model",
    }
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for key in ("reasoning_content", "content"):
        text = message.get(key) or ""
        for start in range(0, len(text), 4):
            yield {**head, "choices": [{"index": 0, "delta": {key: text[start : start + 4]}}]}
    for index, call in enumerate(message.get("tool_calls") or ()):
        first = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": [first]}}]}
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 3):
            piece = {"index": index, "function": {"arguments": arguments[start : start + 3]}}
            yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}
    yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    yield {**head, "choices": [], "usage": USAGE}


class TranslatingServer:
    """POST /v1/responses → translate → `chat_model` → translate back (raw ASGI)."""

    def __init__(self) -> None:
        self.chats: list[dict[str, Any]] = []  # the chat requests, as an upstream would get them
        self.streams: list[bytes] = []  # the translated streams, as sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            translated = translate_request(orjson.loads(body))
        except ProxyError as error:
            await self._send(send, error.status, error.body(), b"application/json")
            return
        self.chats.append(translated.chat)
        message, finish = chat_model(translated.chat)
        shell = Shell(translated.echo)
        if not translated.stream:
            completion = {"model": "up-model", "created": 1738000000, "usage": USAGE}
            completion["choices"] = [
                {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
            ]
            await self._send(
                send, 200, orjson.dumps(response_from_chat(completion, shell)), b"application/json"
            )
            return
        translator = StreamTranslator(shell)
        data = (
            b"".join(translator.feed(chunk) for chunk in chunks_of(message, finish))
            + translator.done()
        )
        self.streams.append(data)
        await self._send(send, 200, data, b"text/event-stream")

    @staticmethod
    async def _send(send: Any, status: int, body: bytes, kind: bytes) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[TranslatingServer, RunningServer]]:
    app = TranslatingServer()
    with RunningServer(app) as running:
        yield app, running


@pytest.fixture
def client(server: tuple[TranslatingServer, RunningServer]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server[1].url + "/v1", api_key="k", max_retries=0) as client:
        yield client


def test_create_non_stream(client: openai.OpenAI) -> None:
    response = client.responses.create(model="route", input="Say hello.", instructions="Be kind.")
    assert response.output_text == "Hello there!"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (
        30,
        16,
    )
    assert (response.usage.output_tokens, response.usage.total_tokens) == (9, 39)


def test_create_stream_events_parse(
    client: openai.OpenAI, server: tuple[TranslatingServer, RunningServer]
) -> None:
    with client.responses.create(model="route", input="Say hello.", stream=True) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello there!"
    assert events[-1].type == "response.completed"
    check_stream(events_of(server[0].streams[-1]))


def test_stream_accumulator_gets_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="route", input="Weather in Paris?", tools=[WEATHER]
    ) as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    call = final.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == (
        "call_w1",
        "get_weather",
        '{"city":"Paris"}',
    )
    assert call.parsed_arguments == {"city": "Paris"}  # strict tool: the SDK parsed it
    assert final.usage is not None
    assert final.usage.total_tokens == 39


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_parses(
    client: openai.OpenAI, server: tuple[TranslatingServer, RunningServer], stream: bool
) -> None:
    if stream:
        with client.responses.stream(model="route", input="Paris?", text_format=Answer) as events:
            parsed = events.get_final_response().output_parsed
    else:
        parsed = client.responses.parse(
            model="route", input="Paris?", text_format=Answer
        ).output_parsed
    assert parsed == Answer(city="Paris", degrees=21)
    response_format = server[0].chats[-1]["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Answer"
    assert response_format["json_schema"]["strict"] is True


def test_a_refused_parameter_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="route", input="hi", tools=[{"type": "web_search"}])
    assert refused.value.param == "tools[0].type"  # type: ignore[attr-defined]
    assert refused.value.code == "unsupported_parameter"  # type: ignore[attr-defined]


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_runs_a_tool_round_trip(
    server: tuple[TranslatingServer, RunningServer], streamed: bool
) -> None:
    app, running = server
    before = len(app.chats)
    result = run_weather_agent(running.url, "route", streamed=streamed)
    assert result.final_output == "The weather: sunny in Paris."
    first, second = app.chats[before:]
    assert first["messages"][0] == {"role": "system", "content": "Answer with the tool."}
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == "call_w1"
    assert assistant["reasoning_content"] == "I need the weather."  # back inside the tool loop
    assert tool == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny in Paris"}
