"""A non-stream chat completion → the Responses API `response` object (pure), valid for
openai-python's `Response`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response

from proxy.mock.replay import strip_header
from proxy.responses import Shell, response_from_chat, translate_request
from tests.provider_shapes import FIXTURES
from tests.responses_checks import summary


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1738000000,
        "model": "up-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        **extra,
    }


def translate(chat: dict[str, Any], request: dict[str, Any] | None = None) -> Response:
    echo = translate_request({"model": "route", "input": "hi", **(request or {})}).echo
    body = response_from_chat(chat, Shell(echo))
    orjson.dumps(body)  # JSON all through
    return Response.model_validate(body)


def _call(call_id: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


CASES: list[Any] = [
    pytest.param(
        completion({"content": "Hello"}),
        [("message", [("output_text", "Hello")], "completed")],
        "completed",
        id="text",
    ),
    pytest.param(
        completion({"content": "Hi", "reasoning_content": "Think."}),
        [("reasoning", "Think.", "completed"), ("message", [("output_text", "Hi")], "completed")],
        "completed",
        id="reasoning-first",
    ),
    pytest.param(
        completion(
            {
                "content": None,
                "tool_calls": [
                    _call("call_a", '{"city":"Paris"}'),
                    _call("call_b", '{"city":"Rome"}'),
                ],
            },
            "tool_calls",
        ),
        [
            ("function_call", "call_a", "get_weather", '{"city":"Paris"}', "completed"),
            ("function_call", "call_b", "get_weather", '{"city":"Rome"}', "completed"),
        ],
        "completed",
        id="parallel-tool-calls",
    ),
    pytest.param(
        completion(
            {"content": "Let me check.", "tool_calls": [_call("call_a", "{}")]}, "tool_calls"
        ),
        [
            ("message", [("output_text", "Let me check.")], "completed"),
            ("function_call", "call_a", "get_weather", "{}", "completed"),
        ],
        "completed",
        id="text-and-tool-call",
    ),
    pytest.param(
        completion({"content": None, "refusal": "I can't help with that."}),
        [("message", [("refusal", "I can't help with that.")], "completed")],
        "completed",
        id="refusal",
    ),
    pytest.param(
        completion({"content": "Once upon"}, "length"),
        [("message", [("output_text", "Once upon")], "incomplete")],
        "incomplete",
        id="length",
    ),
    pytest.param(
        completion({"content": ""}, "content_filter"), [], "incomplete", id="content-filter"
    ),
    pytest.param({**completion({}), "choices": []}, [], "completed", id="no-choices"),
]


@pytest.mark.parametrize(("chat", "output", "status"), CASES)
def test_body_translates(chat: dict[str, Any], output: list[Any], status: str) -> None:
    response = translate(chat)
    assert summary(response) == output
    assert response.status == status
    assert response.id.startswith("resp_")
    assert (response.object, response.model, response.created_at) == (
        "response",
        "up-model",
        1738000000,
    )
    assert len({item.id for item in response.output}) == len(response.output)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("length", "max_output_tokens"),
        ("content_filter", "content_filter"),
        ("insufficient_system_resource", None),
    ],
)
def test_unfinished_answers_say_why(finish: str, reason: str | None) -> None:
    response = translate(completion({"content": "x"}, finish))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == reason


def test_deepseek_body_usage_is_exact() -> None:
    """DeepSeek's recorded answer: its reasoning, text and usage with its own cache field."""
    chat = orjson.loads(strip_header((FIXTURES / "deepseek-body.json").read_bytes()))
    response = translate(chat)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    u = chat["usage"]
    assert response.usage.input_tokens == u["prompt_tokens"]
    assert response.usage.input_tokens_details.cached_tokens == u["prompt_cache_hit_tokens"]
    assert response.usage.output_tokens == u["completion_tokens"]
    assert (
        response.usage.output_tokens_details.reasoning_tokens
        == u["completion_tokens_details"]["reasoning_tokens"]
    )
    assert response.usage.total_tokens == u["total_tokens"]


def test_the_response_repeats_the_request() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    request = {
        "instructions": "Be brief.",
        "text": {"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
        "top_p": 0.5,
        "metadata": {"k": "v"},
        "reasoning": {"effort": "low"},
        "parallel_tool_calls": False,
    }
    response = translate(completion({"content": '{"a": 1}'}), request)
    assert response.instructions == "Be brief."
    assert response.text is not None
    assert response.text.format is not None
    assert response.text.format.type == "json_schema"
    assert (response.top_p, response.metadata, response.parallel_tool_calls) == (
        0.5,
        {"k": "v"},
        False,
    )
    assert response.reasoning is not None
    assert response.reasoning.effort == "low"
    assert response.output_text == '{"a": 1}'


def test_defaults_are_openais() -> None:
    response = translate(completion({"content": "x"}))
    assert (
        response.tools,
        response.tool_choice,
        response.parallel_tool_calls,
        response.truncation,
    ) == ([], "auto", True, "disabled")
    assert response.error is None
    assert response.previous_response_id is None
