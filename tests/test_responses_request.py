"""A Responses request → the chat completions request of a `responses: chat` upstream (pure):
every parameter translated, ignored with its reason or refused with a 400 naming it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import response_create_params

from proxy.errors import BadRequest, Untranslatable
from proxy.responses import translate_request
from proxy.responses.request import IGNORED, KNOWN, REFUSED, REFUSED_UNLESS, TRANSLATED
from tests.test_docs import DOCS, first_cells, section

USER = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _call(call_id: str, arguments: str = "{}") -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": "get_weather",
        "arguments": arguments,
    }


def _chat_call(call_id: str, arguments: str = "{}") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


def _says(role: str, *content: Any) -> dict[str, Any]:
    """A message: one string as its content, else the parts as a list."""
    if len(content) == 1 and isinstance(content[0], str):
        return {"role": role, "content": content[0]}
    return {"role": role, "content": list(content)}


def _part(kind: str, text: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **({} if text is None else {"text": text}), **fields}


def _assistant(content: str | None, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **fields}


def _reasoning(summary: str = "", **fields: Any) -> dict[str, Any]:
    """A reasoning item: its summary text, or `content` as reasoning text, or neither."""
    content = fields.pop("content", None)
    item: dict[str, Any] = {"type": "reasoning", "id": "rs_1", **fields}
    item["summary"] = [{"type": "summary_text", "text": summary}] if summary else []
    if content:
        item["content"] = [{"type": "reasoning_text", "text": content}]
    return item


def _output(call_id: str, output: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def _tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# One tool-loop step as Responses input items, and as the chat messages they become.
LOOP = [_call("call_1"), _output("call_1", "x")]
CALLED, RESULT = [_chat_call("call_1")], _tool_message("call_1", "x")

# (the request's parameters besides model, the chat body's besides model)
TRANSLATIONS: list[Any] = [
    pytest.param({"input": "hi"}, {"messages": USER}, id="input-string"),
    pytest.param(
        {"input": "hi", "instructions": "Be brief."},
        {"messages": [{"role": "system", "content": "Be brief."}, *USER]},
        id="instructions-first",
    ),
    pytest.param(
        {
            "input": [
                {"role": "system", "content": "s"},
                {"role": "developer", "content": "d"},
                {"type": "message", "role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "system", "content": "d"},  # chat-only servers know no developer
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        id="message-roles",
    ),
    pytest.param(
        {
            "input": [
                _says("user", _part("input_text", "one"), _part("input_text", "two")),
                {"type": "message", "id": "msg_1", "status": "completed"}
                | _says("assistant", _part("output_text", "three", annotations=[])),
            ]
        },
        {"messages": [_says("user", "one\ntwo"), _says("assistant", "three")]},
        id="text-parts-join",
    ),
    pytest.param(
        {
            "input": [
                _says(
                    "user",
                    _part("input_text", "what is this?"),
                    _part("input_image", image_url="https://x/cat.png", detail="low"),
                )
            ]
        },
        {
            "messages": [
                _says(
                    "user",
                    _part("text", "what is this?"),
                    _part("image_url", image_url={"url": "https://x/cat.png", "detail": "low"}),
                )
            ]
        },
        id="input-image",
    ),
    pytest.param(
        {
            "input": [
                *USER,
                {"role": "assistant", "content": "Checking both."},
                _call("call_1", '{"city":"Paris"}'),
                _call("call_2", '{"city":"Rome"}'),
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "rain"}],
                },
            ]
        },
        {
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "content": "Checking both.",
                    "tool_calls": [
                        _chat_call("call_1", '{"city":"Paris"}'),
                        _chat_call("call_2", '{"city":"Rome"}'),
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
            ]
        },
        id="parallel-function-calls-one-assistant-message",
    ),
    pytest.param(
        {"input": [*USER, *LOOP]},
        {"messages": [*USER, _assistant(None, tool_calls=CALLED), RESULT]},
        id="function-call-alone",
    ),
    pytest.param(
        {"input": [*USER, _reasoning(summary="need weather"), *LOOP]},
        {
            "messages": [
                *USER,
                _assistant(None, reasoning_content="need weather", tool_calls=CALLED),
                RESULT,
            ]
        },
        id="reasoning-goes-back-inside-a-tool-loop",
    ),
    pytest.param(
        {
            "input": [
                *USER,
                _reasoning(content="hm"),
                _assistant("hello"),
                _reasoning(encrypted_content="gAAAA"),
                _call("call_1"),
            ]
        },
        {
            "messages": [
                *USER,
                _assistant("hello", tool_calls=[_chat_call("call_1")], reasoning_content="hm"),
            ]
        },
        id="reasoning-text-kept-encrypted-left-out",
    ),
    pytest.param(
        {
            "input": [
                *USER,
                _reasoning(summary="t"),
                _assistant("a"),
                *USER,
            ]
        },
        {"messages": [*USER, _assistant("a"), *USER]},
        id="reasoning-before-a-final-answer-left-out",
    ),
    pytest.param(
        {"input": "hi", "tools": [TOOL]}, {"messages": USER, "tools": [CHAT_TOOL]}, id="tools"
    ),
    pytest.param(
        {"input": "hi", "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
        {
            "messages": USER,
            "tools": [CHAT_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        id="tool-choice-string",
    ),
    pytest.param(
        {
            "input": "hi",
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
        },
        {
            "messages": USER,
            "tools": [CHAT_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        id="tool-choice-function",
    ),
    pytest.param(
        {"input": "hi", "tools": [], "tool_choice": "none", "parallel_tool_calls": True},
        {"messages": USER},  # chat refuses both without tools
        id="tool-settings-without-tools",
    ),
    pytest.param(
        {
            "input": "hi",
            "text": {
                "format": {"type": "json_schema", "name": "A", "schema": SCHEMA, "strict": True}
            },
        },
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "A", "schema": SCHEMA, "strict": True},
            },
        },
        id="text-format-json-schema",
    ),
    pytest.param(
        {"input": "hi", "text": {"format": {"type": "json_object"}, "verbosity": "low"}},
        {"messages": USER, "response_format": {"type": "json_object"}, "verbosity": "low"},
        id="text-format-json-object",
    ),
    pytest.param(
        {"input": "hi", "text": {"format": {"type": "text"}}},
        {"messages": USER},
        id="text-format-text",
    ),
    pytest.param(
        {"input": "hi", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1"},
        {"messages": USER, "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1"},
        id="sampling",
    ),
    pytest.param(
        {"input": "hi", "reasoning": {"effort": "high", "summary": "auto"}},
        {"messages": USER, "reasoning_effort": "high"},
        id="reasoning-effort",
    ),
    pytest.param(
        {"input": "hi", "stream": True},
        {"messages": USER, "stream": True, "stream_options": {"include_usage": True}},
        id="stream",
    ),
    pytest.param(
        {
            "input": "hi",
            "store": True,
            "metadata": {"k": "v"},
            "include": ["reasoning.encrypted_content"],
            "background": False,
            "truncation": "disabled",
            "top_logprobs": 0,
            "stream_options": {"include_obfuscation": False},
            "previous_response_id": None,
        },
        {"messages": USER},
        id="accepted-and-ignored",
    ),
]


@pytest.mark.parametrize(("request_", "chat"), TRANSLATIONS)
def test_translates(request_: dict[str, Any], chat: dict[str, Any]) -> None:
    translated = translate_request({"model": "m", **request_})
    assert translated.chat == {"model": "m", **chat}
    assert translated.stream is (chat.get("stream") is True)


def test_the_echo_is_what_a_response_object_repeats() -> None:
    request = {
        "model": "m",
        "input": "hi",
        "instructions": "Be brief.",
        "tools": [TOOL],
        "tool_choice": "auto",
        "temperature": 0.5,
        "metadata": {"k": "v"},
        "store": False,
        "stream": True,
    }
    echo = translate_request(request).echo
    assert echo == {key: request[key] for key in request if key not in ("input", "store", "stream")}


# (the request's parameters besides model and input, the param the 400 names)
REFUSALS: list[Any] = [
    pytest.param(
        {"previous_response_id": "resp_1"}, "previous_response_id", id="previous-response-id"
    ),
    pytest.param({"conversation": "conv_1"}, "conversation", id="conversation"),
    pytest.param({"prompt": {"id": "pmpt_1"}}, "prompt", id="stored-prompt"),
    pytest.param({"background": True}, "background", id="background"),
    pytest.param({"truncation": "auto"}, "truncation", id="truncation-auto"),
    pytest.param({"top_logprobs": 2}, "top_logprobs", id="top-logprobs"),
    pytest.param(
        {"context_management": [{"type": "compaction"}]}, "context_management", id="compaction"
    ),
    pytest.param(
        {"include": ["reasoning.encrypted_content", "file_search_call.results"]},
        "include[1]",
        id="include",
    ),
    pytest.param({"tools": [TOOL, {"type": "web_search"}]}, "tools[1].type", id="web-search"),
    pytest.param(
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs"]}]},
        "tools[0].type",
        id="file-search",
    ),
    pytest.param({"tools": [{"type": "computer_use_preview"}]}, "tools[0].type", id="computer-use"),
    pytest.param({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", id="code-interpreter"),
    pytest.param({"tools": [{"type": "image_generation"}]}, "tools[0].type", id="image-generation"),
    pytest.param({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type", id="mcp"),
    pytest.param({"tools": [{"type": "custom", "name": "x"}]}, "tools[0].type", id="custom-tool"),
    pytest.param(
        {"tools": [{**TOOL, "defer_loading": True}]}, "tools[0].defer_loading", id="tool-search"
    ),
    pytest.param(
        {"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}},
        "tool_choice",
        id="hosted-tool-choice",
    ),
    pytest.param(
        {"tools": [TOOL], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
        "tool_choice",
        id="allowed-tools",
    ),
    pytest.param(
        {"reasoning": {"effort": "low", "context": "x"}}, "reasoning.context", id="reasoning-other"
    ),
]
# (the request's `input`, the param the 400 names)
INPUT_REFUSALS: list[Any] = [
    pytest.param([{"type": "item_reference", "id": "msg_1"}], "input[0].type", id="item-reference"),
    pytest.param(
        [*USER, {"type": "web_search_call", "id": "ws_1"}], "input[1].type", id="hosted-tool-item"
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}],
        "input[0].content[0].type",
        id="input-file",
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
        "input[0].content[0].file_id",
        id="image-by-file-id",
    ),
    pytest.param(
        [
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "input_image", "image_url": "u"}],
            }
        ],
        "input[0].output[0].type",
        id="image-in-tool-output",
    ),
]


def _refused(request: dict[str, Any], error: type[BadRequest] = Untranslatable) -> BadRequest:
    with pytest.raises(BadRequest) as refused:
        translate_request(request)
    assert type(refused.value) is error
    body = orjson.loads(refused.value.body())["error"]
    assert refused.value.status == 400
    assert body["type"] == "invalid_request_error"
    assert body["param"] == refused.value.param
    return refused.value


@pytest.mark.parametrize(("request_", "param"), REFUSALS)
def test_refuses_naming_the_parameter(request_: dict[str, Any], param: str) -> None:
    error = _refused({"model": "m", "input": "hi", **request_})
    assert error.param == param
    assert error.code == "unsupported_parameter"
    assert param.split("[", maxsplit=1)[0].split(".", maxsplit=1)[0] in error.message


@pytest.mark.parametrize(("input_", "param"), INPUT_REFUSALS)
def test_refuses_input_it_cannot_translate(input_: list[Any], param: str) -> None:
    error = _refused({"model": "m", "input": input_})
    assert (error.param, error.code) == (param, "unsupported_parameter")
    assert param.rsplit(".", 1)[0] in error.message


def test_unknown_parameters_are_named() -> None:
    error = _refused({"model": "m", "input": "hi", "temprature": 1, "zeta": 2}, BadRequest)
    assert (error.param, error.code) == ("temprature", "unknown_parameter")
    assert "'temprature', 'zeta'" in error.message


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": 5, "input": "hi"}, "model"),
        ({"model": "m", "input": "hi", "instructions": ["x"]}, "instructions"),
        ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"model": "m", "input": ["hi"]}, "input[0]"),
        ({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "m", "input": "hi", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": "m", "input": "hi", "text": {"fromat": {}}}, "text.fromat"),
    ],
)
def test_malformed_requests_name_the_parameter(request_: dict[str, Any], param: str) -> None:
    assert _refused(request_, BadRequest).param == param


def test_every_parameter_of_the_sdk_is_in_one_table() -> None:
    """A parameter openai-python sends is translated, ignored with a reason, or refused: none
    is an 'unknown parameter', and none is in two tables."""
    sdk = set(response_create_params.ResponseCreateParamsStreaming.__annotations__)
    assert sdk <= KNOWN, sorted(sdk - KNOWN)
    tables = [set(TRANSLATED), {"include"}, set(IGNORED), set(REFUSED), set(REFUSED_UNLESS)]
    assert sum(len(table) for table in tables) == len(KNOWN)


def test_behaviour_md_lists_every_parameter_once() -> None:
    text = section(DOCS / "BEHAVIOUR.md", "The Responses API on a chat upstream")
    rows = first_cells(text)
    assert sorted(rows) == sorted(KNOWN)


def test_a_client_string_quoted_in_an_error_is_clipped() -> None:
    """One request cannot write megabytes into an error body and the access log."""
    huge = "x" * 100_000
    for request in (
        {"model": "m", "input": "hi", huge: 1},
        {"model": "m", "input": "hi", "tools": [{"type": huge}]},
        {"model": "m", "input": [{"type": huge}]},
        {"model": "m", "input": "hi", "truncation": huge},
        {"model": "m", "input": "hi", "reasoning": {huge: 1}},
        {"model": "m", "input": "hi", "text": {huge: 1}},
    ):
        with pytest.raises(BadRequest) as refused:
            translate_request(request)
        assert len(refused.value.message) < 400
        assert len(refused.value.param or "") < 400
