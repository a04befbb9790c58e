"""The mock's chat completions answers beyond plain text, as a chat-only server shapes them
(what `/v1/responses` on a `responses: chat` upstream becomes): a tool call when the request
has function tools and no tool result yet (its arguments filled in from the tool's schema),
JSON that fits `response_format` json_schema, DeepSeek's `reasoning_content` before the answer
(knob `reasoning`), and cached prompt tokens (knob `cached_tokens`) in OpenAI's and DeepSeek's
usage fields. Every delta is one token, as in `ChatPlan.output_tokens`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.mock.content import CREATED, Plan, draw_tokens, usage
from proxy.mock.knobs import Knobs
from proxy.mock.responses import _example, _pieces

Chunk = dict[str, Any]


def wants_shapes(body: dict[str, Any], knobs: Knobs) -> bool:
    """Whether a chat request needs this module rather than the plain text answer."""
    return bool(knobs.reasoning or knobs.cached_tokens or _tool(body) or _schema(body))


@dataclass(frozen=True, slots=True)
class ChatEvents:
    """A chat stream as `upstream._stream` writes it (the shape of `content.StreamEvents`)."""

    role: bytes
    content: tuple[bytes, ...]
    final: bytes
    usage_chunk: bytes
    done: bytes = b"data: [DONE]\n\n"

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.usage_chunk


@dataclass(frozen=True, slots=True)
class ChatPlan(Plan):
    body: dict[str, Any] | None = None
    reasoning: int = 0  # output tokens that are reasoning_content
    cached: int = 0  # prompt tokens read from the (pretend) cache

    def deltas(self) -> list[Chunk]:
        """The deltas of the answer, one token each: reasoning, then a tool call or text."""
        body = self.body or {}
        out: list[Chunk] = [
            {"content": None, "reasoning_content": piece}
            for piece in draw_tokens(self.seed + 1, self.reasoning)
        ]
        tool = _tool(body)
        if tool is not None:
            arguments = _pieces(orjson.dumps(_example(tool.get("parameters") or {})).decode())
            opening = {"id": f"call_mock{self.seed}", "type": "function"}
            for i, piece in enumerate(arguments):
                call: Chunk = {"index": 0, "function": {"arguments": piece}}
                if i == 0:
                    call = {
                        **call,
                        **opening,
                        "function": {"name": tool["name"], "arguments": piece},
                    }
                out.append({"tool_calls": [call]})
            return out
        schema = _schema(body)
        text = (
            _pieces(schema)
            if schema is not None
            else draw_tokens(self.seed, self.tokens - self.reasoning)
        )
        out.extend({"content": piece} for piece in text)
        return out

    def output_tokens(self) -> int:
        return len(self.deltas())

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if _tool(self.body or {}) is not None else self.finish

    def usage(self) -> Chunk:
        counts: Chunk = usage(self.prompt_tokens, self.output_tokens())
        cached = min(self.cached, self.prompt_tokens)
        counts["prompt_tokens_details"] = {"cached_tokens": cached}
        counts["completion_tokens_details"] = {"reasoning_tokens": self.reasoning}
        counts["prompt_cache_hit_tokens"] = cached  # DeepSeek's name for it
        counts["prompt_cache_miss_tokens"] = self.prompt_tokens - cached
        return counts

    def message(self) -> Chunk:
        """The whole answer as one chat message."""
        message: Chunk = {"role": "assistant", "content": None}
        for delta in self.deltas():
            for key in ("content", "reasoning_content"):
                if delta.get(key) is not None:
                    message[key] = (message.get(key) or "") + delta[key]
            for call in delta.get("tool_calls", ()):
                calls = message.setdefault("tool_calls", [{"function": {"arguments": ""}}])
                opening = {k: v for k, v in call.items() if k not in ("index", "function")}
                calls[0].update(opening)
                calls[0]["function"].update(
                    {k: v for k, v in call["function"].items() if k == "name"}
                )
                calls[0]["function"]["arguments"] += call["function"]["arguments"]
        return message

    def body_bytes(self) -> bytes:
        choice = {"index": 0, "message": self.message(), "finish_reason": self.finish_reason}
        return orjson.dumps(
            {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        )

    def events(self) -> ChatEvents:
        head = self._head("chat.completion.chunk")
        extra = {"usage": None} if self.include_usage else {}

        def chunk(delta: Chunk, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + orjson.dumps({**head, "choices": [choice], **extra}) + b"\n\n"

        usage_chunk = orjson.dumps({**head, "choices": [], "usage": self.usage()})
        return ChatEvents(
            role=chunk({"role": "assistant", "content": ""}),
            content=tuple(chunk(delta) for delta in self.deltas()),
            final=chunk({}, self.finish_reason),
            usage_chunk=b"data: " + usage_chunk + b"\n\n",
        )

    def _head(self, kind: str) -> Chunk:
        return {
            "id": f"chatcmpl-mock-{self.seed}",
            "object": kind,
            "created": CREATED,
            "model": self.model,
        }


def plan_chat(plain: Plan, body: dict[str, Any], knobs: Knobs) -> ChatPlan:
    """`plain` (the text answer's plan) with the shapes this module adds."""
    reasoning = min(knobs.reasoning, plain.tokens)
    return ChatPlan(
        seed=plain.seed, model=plain.model, tokens=plain.tokens, finish=plain.finish,
        stream=plain.stream, include_usage=plain.include_usage, prompt_tokens=plain.prompt_tokens,
        body=body, reasoning=reasoning, cached=knobs.cached_tokens,
    )  # fmt: skip


def _tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first function tool, unless a tool result is already in (or none is asked)."""
    messages = body.get("messages")
    if body.get("tool_choice") == "none" or any(
        isinstance(m, dict) and m.get("role") == "tool" for m in messages or ()
    ):
        return None
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function
    return None


def _schema(body: dict[str, Any]) -> str | None:
    """With `response_format` json_schema: a JSON text that fits the schema."""
    form = body.get("response_format")
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return None
    schema = (form.get("json_schema") or {}).get("schema")
    return orjson.dumps(_example(schema if isinstance(schema, dict) else {})).decode()
