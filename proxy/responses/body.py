"""A non-stream chat completion → the Responses API's `response` object (pure).

Output items, in the order a Responses model writes them: the reasoning (DeepSeek's
`reasoning_content`, or `reasoning` as newer vLLM names it), the message (its text, then its
refusal), then one `function_call` per tool call. A `length` finish makes the response
`incomplete` with reason `max_output_tokens`, and its items `incomplete`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.responses import items
from proxy.responses.items import Shell, new_id

REASONING_FIELDS = ("reasoning_content", "reasoning")


def response_from_chat(completion: Mapping[str, Any], shell: Shell) -> dict[str, Any]:
    shell.seen(completion)
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, Mapping) else None
    status, details = items.outcome(
        choice.get("finish_reason") if isinstance(choice, Mapping) else None
    )
    output = _output(message, status) if isinstance(message, Mapping) else []
    return shell.response(status, output, items.usage_of(completion.get("usage")), details)


def reasoning_of(message: Mapping[str, Any]) -> str:
    """The reasoning text of a chat message or delta, under either server's name."""
    for key in REASONING_FIELDS:
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _output(message: Mapping[str, Any], status: str) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning:
        output.append(items.reasoning_item(new_id("rs"), reasoning, status))
    parts = []
    if isinstance(message.get("content"), str) and message["content"]:
        parts.append(items.text_part(message["content"]))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append(items.refusal_part(message["refusal"]))
    if parts:
        output.append(items.message_item(new_id("msg"), parts, status))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        call_id = call.get("id") or new_id("call")
        arguments = function.get("arguments") or ""
        output.append(
            items.function_call_item(
                new_id("fc"), call_id, function.get("name", ""), arguments, status
            )
        )
    return output
