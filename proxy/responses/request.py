"""A Responses API request → the chat completions request of a `responses: chat` upstream (pure).

Every top-level parameter is in exactly one table: translated (`_TRANSLATED`), accepted and
ignored with its reason (`IGNORED`), or refused with a 400 naming it (`REFUSED`, some only for
values that need what a chat upstream lacks: stored state, built-in tools, logprobs). Any other
key is an unknown parameter, a 400 as well: nothing is dropped silently. A parameter set to
null counts as absent. docs/BEHAVIOUR.md renders the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import BadRequest, Untranslatable, clipped
from proxy.responses.inputs import MAX_QUOTED, chat_messages, expect, quoted

# Request parameters a Response object repeats (and that the SDKs read back from it).
ECHOED = (
    "model",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "reasoning",
    "user",
    "metadata",
    "truncation",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "top_logprobs",
    "background",
    "max_tool_calls",
)
# Chat completions has the same parameter under the same name.
_SAME_NAME = (
    "temperature",
    "top_p",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
)
IGNORED = {
    "store": "accepted (the API's default is true): a translated response is not stored, "
    "so it cannot be retrieved or continued with previous_response_id",
    "metadata": "echoed in the response; chat completions takes metadata only with its own "
    "stored completions",
    "stream_options": "its one option, include_obfuscation, pads events the proxy writes "
    "itself: a translated stream has no obfuscation field",
    "max_tool_calls": "limits calls to built-in tools, which translation refuses",
}
# Refused always, whatever the value (null aside).
REFUSED = {
    "previous_response_id": "a chat upstream keeps no conversation: send the whole input",
    "conversation": "a chat upstream keeps no conversation: send the whole input",
    "prompt": "stored prompt templates exist only on OpenAI's side",
    "context_management": "server-side compaction needs the Responses API",
    "background_options": "background mode needs stored responses",
    "access_programs": "no chat completions equivalent",
    "image": "no chat completions equivalent",
    "moderation": "no chat completions equivalent",
    "prompt_cache_options": "no chat completions equivalent",
}
# Refused except for these values, which ask for nothing a chat upstream lacks.
REFUSED_UNLESS: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((False,), "background mode needs stored responses"),
    "truncation": (("disabled",), "a chat upstream cannot drop input items to fit its context"),
    "top_logprobs": ((0,), "logprobs are not translated"),
}
# `include` values that need nothing: nothing is encrypted (reasoning comes back as text) and
# input items are never returned.
INCLUDE_IGNORED = ("reasoning.encrypted_content", "message.input_image.image_url")
_TEXT_FORMATS = ("text", "json_object", "json_schema")
_JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")
_REASONING_IGNORED = ("summary", "generate_summary")  # the reasoning text is returned whole


@dataclass(frozen=True, slots=True)
class Translated:
    chat: dict[str, Any]  # the chat completions body; each attempt sets its own `model`
    echo: dict[str, Any] = field(default_factory=dict)  # what the Response object repeats

    @property
    def stream(self) -> bool:
        return self.chat.get("stream") is True


def translate_request(payload: Mapping[str, Any]) -> Translated:
    """The chat request for a Responses request, or Untranslatable/BadRequest naming the
    parameter that stops it."""
    given = {key: value for key, value in payload.items() if value is not None}
    unknown = sorted(set(given) - KNOWN)
    if unknown:
        raise _unknown(unknown)
    for key, value in given.items():
        _check_refused(key, value)
    model = expect(given.get("model"), str, "model")
    instructions = expect(given.get("instructions", ""), str, "instructions")
    if "input" not in given:
        raise BadRequest("Missing required parameter: 'input'.", param="input")
    chat: dict[str, Any] = {"model": model, "messages": chat_messages(given["input"], instructions)}
    for key, value in given.items():
        if key in _TRANSLATED:
            _TRANSLATED[key](value, chat)
    if not chat.get("tools"):  # chat refuses tool_choice and parallel_tool_calls without tools
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            chat.pop(key, None)
    return Translated(chat=chat, echo=echo_of(given))


def echo_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters a Response object repeats (cheap: no translation)."""
    return {key: payload[key] for key in ECHOED if payload.get(key) is not None}


def _unknown(names: list[str]) -> BadRequest:
    """OpenAI's answer to parameters it does not know: the first few named, each clipped."""
    listed = ", ".join(quoted(name) for name in names[:5]) + (", …" if len(names) > 5 else "")
    first = clipped(names[0], MAX_QUOTED)
    return BadRequest(f"Unknown parameter: {listed}.", param=first, code="unknown_parameter")


def _check_refused(key: str, value: Any) -> None:
    if key in REFUSED:
        raise Untranslatable(
            f"'{key}' is not supported by this upstream: {REFUSED[key]}.", param=key
        )
    if key in REFUSED_UNLESS:
        allowed, reason = REFUSED_UNLESS[key]
        if value not in allowed or type(value) is not type(allowed[0]):
            raise Untranslatable(
                f"'{key}': {quoted(value)} is not supported by this upstream: {reason}.", param=key
            )
    if key == "include":
        for index, name in enumerate(expect(value, list, "include")):
            if name not in INCLUDE_IGNORED:
                message = f"include value {quoted(name)} is not supported by this upstream"
                raise Untranslatable(message, param=f"include[{index}]")


def _stream(value: Any, chat: dict[str, Any]) -> None:
    if expect(value, bool, "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the proxy strips it where refused


def _tools(value: Any, chat: dict[str, Any]) -> None:
    chat["tools"] = [
        _tool(tool, f"tools[{i}]") for i, tool in enumerate(expect(value, list, "tools"))
    ]


def _tool(tool: Any, param: str) -> dict[str, Any]:
    kind = expect(tool, dict, param).get("type")
    if kind != "function":
        message = (
            f"{param}: tool type {quoted(kind)} is not supported by this upstream: "
            "only function tools translate to chat completions"
        )
        raise Untranslatable(message, param=f"{param}.type")
    for key in ("defer_loading", "allowed_callers"):
        if tool.get(key):
            raise Untranslatable(
                f"{param}.{key} needs the Responses API's tool search", param=f"{param}.{key}"
            )
    function = {"name": expect(tool.get("name"), str, f"{param}.name")}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    if value in ("none", "auto", "required"):
        chat["tool_choice"] = value
        return
    if isinstance(value, dict) and value.get("type") == "function":
        name = expect(value.get("name"), str, "tool_choice.name")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
        return
    kind = value.get("type") if isinstance(value, dict) else value
    message = (
        f"tool_choice {quoted(kind)} is not supported by this upstream: "
        "only none, auto, required and a function translate"
    )
    raise Untranslatable(message, param="tool_choice")


def _text(value: Any, chat: dict[str, Any]) -> None:
    text = expect(value, dict, "text")
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise _unknown([f"text.{name}" for name in unknown])
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    fmt = expect(text.get("format", {"type": "text"}), dict, "text.format")
    kind = fmt.get("type")
    if kind not in _TEXT_FORMATS:
        raise BadRequest(
            f"text.format.type must be one of {', '.join(_TEXT_FORMATS)}", param="text.format.type"
        )
    if kind == "json_schema":
        schema = {key: fmt[key] for key in _JSON_SCHEMA_KEYS if fmt.get(key) is not None}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind == "json_object":
        chat["response_format"] = {"type": "json_object"}


def _reasoning(value: Any, chat: dict[str, Any]) -> None:
    reasoning = expect(value, dict, "reasoning")
    for key, setting in reasoning.items():
        if setting is None or key in _REASONING_IGNORED:
            continue
        if key != "effort":
            name = clipped(f"reasoning.{key}", MAX_QUOTED)
            raise Untranslatable(f"'{name}' is not supported by this upstream.", param=name)
        chat["reasoning_effort"] = setting


def _max_output_tokens(value: Any, chat: dict[str, Any]) -> None:
    # max_tokens, not max_completion_tokens: the one every chat-only server takes (DeepSeek,
    # vLLM, SGLang, Ollama); OpenAI itself has the Responses API natively.
    chat["max_tokens"] = value


def _same(key: str) -> Callable[[Any, dict[str, Any]], None]:
    def copy(value: Any, chat: dict[str, Any]) -> None:
        chat[key] = value

    return copy


_TRANSLATED: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "stream": _stream,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _same("parallel_tool_calls"),
    "text": _text,
    "reasoning": _reasoning,
    "max_output_tokens": _max_output_tokens,
    **{key: _same(key) for key in _SAME_NAME},
}
# model, input and instructions are read first: instructions become the first message.
TRANSLATED = ("model", "input", "instructions", *_TRANSLATED)
KNOWN = frozenset((*TRANSLATED, "include", *IGNORED, *REFUSED, *REFUSED_UNLESS))
