"""The Responses API objects a translation writes, built once for the body and the stream
(pure): ids, output items, the chat answer's ending and usage in Responses terms, and the
`response` object itself with the request parameters it repeats."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["completed", "incomplete"]
# A chat finish_reason → the response's status and incomplete_details.reason. stop, tool_calls
# and function_call complete; an unknown reason (DeepSeek's insufficient_system_resource, an
# abort) is incomplete without a reason.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_COMPLETE = ("stop", "tool_calls", "function_call", None)
# What a Response object says when the request left a parameter out (OpenAI's defaults).
_DEFAULTS: dict[str, Any] = {
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "text": {"format": {"type": "text"}},
    "metadata": {},
    "truncation": "disabled",
    "background": False,
}


# A translated response's id: `resp_` as OpenAI's, then a word no hex id holds, so that a
# retrieval can say why the proxy has none (nothing translated is stored).
TRANSLATED_ID = "resp_chat"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def is_translated_id(response_id: str) -> bool:
    return response_id.startswith(TRANSLATED_ID)


def outcome(finish_reason: Any) -> tuple[Status, dict[str, Any] | None]:
    if finish_reason in _COMPLETE:
        return "completed", None
    return "incomplete", {"reason": _INCOMPLETE.get(finish_reason)}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(refusal: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": refusal}


def summary_part(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": parts,
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """DeepSeek's `reasoning_content` as a summary: what clients show and what the Agents SDK
    itself makes of it (it is the whole reasoning, not a summary)."""
    summary = [summary_part(text)] if text else []
    return {"id": item_id, "type": "reasoning", "summary": summary, "status": status}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def usage_of(chat: Any) -> dict[str, Any] | None:
    """Chat usage → Responses usage; cached tokens from OpenAI's or DeepSeek's field."""
    if not isinstance(chat, Mapping):
        return None
    prompt = _int(chat.get("prompt_tokens"))
    completion = _int(chat.get("completion_tokens"))
    prompt_details = _mapping(chat.get("prompt_tokens_details"))
    cached = prompt_details.get("cached_tokens") or chat.get("prompt_cache_hit_tokens")
    total = chat.get("total_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _int(cached),
            "cache_write_tokens": _int(prompt_details.get("cache_write_tokens")),
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _int(
                _mapping(chat.get("completion_tokens_details")).get("reasoning_tokens")
            )
        },
        "total_tokens": _int(total) if isinstance(total, int) else prompt + completion,
    }


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(slots=True)
class Shell:
    """What every `response` object of one translated request shares."""

    echo: Mapping[str, Any]  # the request parameters it repeats (`Translated.echo`)
    id: str = field(default_factory=lambda: TRANSLATED_ID + secrets.token_hex(24))
    created_at: int = field(default_factory=lambda: int(time.time()))
    model: str = ""

    def __post_init__(self) -> None:
        self.model = self.model or str(self.echo.get("model", ""))

    def seen(self, chat: Mapping[str, Any]) -> None:
        """Take the upstream's model name and creation time, as a chat answer relays them."""
        if isinstance(chat.get("model"), str) and chat["model"]:
            self.model = chat["model"]
        if isinstance(chat.get("created"), int):
            self.created_at = chat["created"]

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        incomplete_details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            **_DEFAULTS,
            **self.echo,
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete_details,
            "model": self.model,
            "output": output,
            "previous_response_id": None,
            "usage": usage,
        }
