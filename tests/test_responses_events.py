"""Chat chunks → Responses API stream events (pure): each event valid for openai-python,
in order, with consistent ids and indexes; every provider's recorded stream translates."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response

from proxy.errors import UpstreamTimeout
from proxy.mock.replay import split_events
from proxy.responses import Shell, StreamTranslator, translate_request
from proxy.sse import DONE, event_data
from tests.provider_shapes import recording
from tests.responses_checks import check_stream, events_of, summary

HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1738000000, "model": "up-model"}
ROLE = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def call(
    index: int, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        piece.update(id=call_id, type="function")
        piece["function"]["name"] = name
    return delta(tool_calls=[piece])


def usage(**fields: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [], "usage": fields}


def translate(
    chunks: list[dict[str, Any]], request: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    echo = translate_request(
        {"model": "route", "input": "hi", "stream": True, **(request or {})}
    ).echo
    translator = StreamTranslator(Shell(echo))
    data = b"".join(translator.feed(chunk) for chunk in chunks) + translator.done()
    assert translator.done() == b""
    assert translator.feed(ROLE) == b""
    return events_of(data)


STOP = delta("stop")
USAGE = usage(prompt_tokens=12, completion_tokens=5, total_tokens=17)
CASES: list[Any] = [
    pytest.param(
        [ROLE, delta(content="Hel"), delta(content="lo"), STOP, USAGE],
        [("message", [("output_text", "Hello")], "completed")],
        "completed",
        id="text",
    ),
    pytest.param(
        [
            ROLE,
            delta(content=None, reasoning_content="Think"),
            delta(content=None, reasoning_content="ing."),
            delta(content="Hi"),
            STOP,
        ],
        [
            ("reasoning", "Thinking.", "completed"),
            ("message", [("output_text", "Hi")], "completed"),
        ],
        "completed",
        id="reasoning-then-text",
    ),
    pytest.param(
        [ROLE, delta(reasoning="vLLM names it so"), delta(content="ok"), STOP],
        [
            ("reasoning", "vLLM names it so", "completed"),
            ("message", [("output_text", "ok")], "completed"),
        ],
        "completed",
        id="reasoning-under-vllm-name",
    ),
    pytest.param(
        [
            ROLE,
            delta(content="Checking."),
            call(0, "", "call_a", "get_weather"),
            call(1, '{"ci', "call_b", "get_weather"),
            call(0, '{"city"'),
            call(1, 'ty":"Rome"}'),
            call(0, ':"Paris"}'),
            delta("tool_calls"),
        ],
        [
            ("message", [("output_text", "Checking.")], "completed"),
            ("function_call", "call_a", "get_weather", '{"city":"Paris"}', "completed"),
            ("function_call", "call_b", "get_weather", '{"city":"Rome"}', "completed"),
        ],
        "completed",
        id="parallel-tool-calls-interleaved",
    ),
    pytest.param(
        [ROLE, delta(content=""), call(0, "{}", "call_a", "ping"), delta("tool_calls")],
        [("function_call", "call_a", "ping", "{}", "completed")],
        "completed",
        id="empty-content-delta-opens-no-message",
    ),
    pytest.param(
        [ROLE, delta(content="Once upon"), delta("length")],
        [("message", [("output_text", "Once upon")], "incomplete")],
        "incomplete",
        id="length-truncated",
    ),
    pytest.param(
        [ROLE, delta(refusal="I can't"), delta(refusal=" help."), STOP],
        [("message", [("refusal", "I can't help.")], "completed")],
        "completed",
        id="refusal",
    ),
    pytest.param([ROLE, STOP], [], "completed", id="role-only-then-stop"),
    pytest.param([], [], "completed", id="no-chunks"),
]


@pytest.mark.parametrize(("chunks", "output", "status"), CASES)
def test_stream_translates(chunks: list[dict[str, Any]], output: list[Any], status: str) -> None:
    events = translate(chunks)
    response = check_stream(events)
    assert response is not None
    assert summary(response) == output
    assert response.status == status
    assert events[-1]["type"] == f"response.{status}"


def test_a_role_only_first_chunk_writes_only_the_opening_events() -> None:
    translator = StreamTranslator(Shell({"model": "route"}))
    assert [e["type"] for e in events_of(translator.feed(ROLE))] == [
        "response.created",
        "response.in_progress",
    ]
    assert translator.feed(delta(content="")) == b""


def test_length_is_incomplete_for_max_output_tokens() -> None:
    response = check_stream(translate([ROLE, delta(content="x"), delta("length")]))
    assert response is not None
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize(
    ("chat_usage", "expected"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}, (12, 0, 5, 0, 17)),
        (
            {
                "prompt_tokens": 40,
                "completion_tokens": 21,
                "total_tokens": 61,
                "prompt_tokens_details": {"cached_tokens": 32},
                "completion_tokens_details": {"reasoning_tokens": 12},
            },
            (40, 32, 21, 12, 61),
        ),
        (  # DeepSeek's own cache field
            {
                "prompt_tokens": 40,
                "completion_tokens": 21,
                "total_tokens": 61,
                "prompt_cache_hit_tokens": 32,
                "prompt_cache_miss_tokens": 8,
            },
            (40, 32, 21, 0, 61),
        ),
    ],
    ids=["plain", "cached-and-reasoning", "deepseek-cache-hit"],
)
def test_usage_is_mapped(chat_usage: dict[str, Any], expected: tuple[int, ...]) -> None:
    response = check_stream(translate([ROLE, delta(content="x"), STOP, usage(**chat_usage)]))
    assert response is not None
    assert response.usage is not None
    u = response.usage
    got = (
        u.input_tokens,
        u.input_tokens_details.cached_tokens,
        u.output_tokens,
        u.output_tokens_details.reasoning_tokens,
        u.total_tokens,
    )
    assert got == expected


def test_without_usage_the_response_has_none() -> None:
    response = check_stream(translate([ROLE, delta(content="x"), STOP]))
    assert response is not None
    assert response.usage is None


def test_the_response_repeats_the_request_and_names_the_upstream_model() -> None:
    tool = {
        "type": "function",
        "name": "ping",
        "parameters": {"type": "object", "properties": {}},
        "strict": False,
    }
    request = {
        "instructions": "Be brief.",
        "tools": [tool],
        "tool_choice": "required",
        "temperature": 0.3,
        "max_output_tokens": 99,
    }
    events = translate([ROLE, delta(content="x"), STOP], request)
    for event in (events[0], events[-1]):
        response = Response.model_validate(event["response"])
        assert response.model == "up-model"
        assert response.created_at == HEAD["created"]
        assert (
            response.instructions,
            response.tool_choice,
            response.temperature,
            response.max_output_tokens,
        ) == ("Be brief.", "required", 0.3, 99)
        assert [t.name for t in response.tools] == ["ping"]  # type: ignore[union-attr]


def test_ids_are_distinct_and_prefixed() -> None:
    events = translate(
        [
            ROLE,
            delta(reasoning_content="r"),
            delta(content="t"),
            call(0, "{}", "call_a", "f"),
            delta("tool_calls"),
        ]
    )
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [item["id"][:3] for item in items] == ["rs_", "msg", "fc_"]
    assert len({item["id"] for item in items}) == 3


def test_a_tool_call_without_an_id_gets_one() -> None:
    chunk = delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "{}"}}])
    response = check_stream(translate([ROLE, chunk, delta("tool_calls")]))
    assert response is not None
    assert response.output[0].call_id.startswith("call_")  # type: ignore[union-attr]


def test_a_failure_mid_stream_ends_with_the_error_event() -> None:
    translator = StreamTranslator(Shell({"model": "route"}))
    data = translator.feed(ROLE) + translator.feed(delta(content="partial"))
    data += translator.error(UpstreamTimeout("upstream went silent for 5 s"))
    events = events_of(data)
    assert check_stream(events) is None
    assert events[-1] == {
        "type": "error",
        "sequence_number": len(events) - 1,
        "code": "upstream_timeout",
        "message": "upstream went silent for 5 s",
        "param": None,
    }
    assert translator.done() == b""
    assert translator.feed(STOP) == b""


def test_an_upstream_error_chunk_becomes_the_error_event() -> None:
    translator = StreamTranslator(Shell({"model": "route"}))
    error = {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}
    events = events_of(translator.feed(ROLE) + translator.feed(error))
    assert check_stream(events) is None
    assert (events[-1]["type"], events[-1]["message"], events[-1]["code"]) == (
        "error",
        "overloaded",
        "overloaded",
    )


@pytest.mark.parametrize(
    "name",
    [
        "deepseek",
        "openai-tools",
        "openai-refusal",
        "azure",
        "vllm",
        "gemini",
        "openrouter",
        "ollama",
    ],
)
def test_every_recorded_provider_stream_translates(name: str) -> None:
    """The chat streams of the provider shapes (tests/fixtures/providers), chunk by chunk."""
    chunks = []
    for event in split_events(recording(name)):
        data = event_data(event.strip())
        if data is not None and data != DONE:
            chunks.append(orjson.loads(data))
    response = check_stream(translate(chunks))
    assert response is not None
    assert response.output
    assert response.usage is not None
    assert response.usage.output_tokens > 0


def _broken(events: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    events = [dict(e) for e in events]
    first_delta = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.delta")
    if how == "sequence":
        events[1]["sequence_number"] = 5
    elif how == "item-id":
        events[first_delta]["item_id"] = "msg_other"
    elif how == "delta-lost":
        del events[first_delta]
        for number, event in enumerate(events):
            event["sequence_number"] = number
    elif how == "item-not-done":
        events = [e for e in events if e["type"] != "response.output_item.done"]
        for number, event in enumerate(events):
            event["sequence_number"] = number
    return events


@pytest.mark.parametrize("how", ["sequence", "item-id", "delta-lost", "item-not-done"])
def test_the_checker_catches_a_broken_stream(how: str) -> None:
    events = translate([ROLE, delta(content="Hel"), delta(content="lo"), STOP])
    check_stream(events)
    with pytest.raises(AssertionError):
        check_stream(_broken(events, how))
