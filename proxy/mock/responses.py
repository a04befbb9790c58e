"""The mock's Responses API (`POST /v1/responses`): the answer's events and body, shaped as
openai-python's `types/responses` (type, then sequence_number, then the event's fields),
and the store that `GET`/`DELETE /v1/responses/{id}`, `.../input_items` and `.../cancel` read.

The output is one optional reasoning item (knob `reasoning`: summary tokens), then either a
function call, when the request has function tools and its input no `function_call_output`
yet (the arguments filled in from the tool's schema), or a message: the seed's text, or,
with `text.format` json_schema, a JSON value that fits the schema. Every delta is one token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import error_body
from proxy.mock.content import (
    CREATED,
    Invalid,
    Plan,
    count_input_tokens,
    count_prompt_tokens,
    draw_tokens,
    seed_and_model,
)
from proxy.mock.knobs import Knobs

Event = dict[str, Any]
JSON_PIECE = 8  # characters of JSON (arguments, structured text) per delta


@dataclass(frozen=True, slots=True)
class ResponsesEvents:
    """A streamed answer's events, grouped as the mock's writer sends them: everything before
    the first delta, one write per delta (with the events that open its item), the `.done`
    events, and the final `response.completed` (the usage)."""

    role: bytes
    content: tuple[bytes, ...]
    final: bytes
    completed: bytes
    done: bytes = b""  # no [DONE] in this API

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.completed


@dataclass(frozen=True, slots=True)
class ResponsePlan(Plan):
    """A Responses API request, once validated: what it answers and how it is numbered."""

    body: dict[str, Any] | None = None
    reasoning: int = 0  # output tokens that are reasoning summary
    cached: int = 0  # input tokens read from the (pretend) cache

    @property
    def response_id(self) -> str:
        key = orjson.dumps([self.seed, self.model, self._get("input"), self._get("instructions")])
        return "resp_mock" + hashlib.blake2b(key, digest_size=12).hexdigest()

    def _get(self, key: str) -> Any:
        return (self.body or {}).get(key)

    def items(self) -> list[tuple[Event, list[str]]]:
        """The output items (complete) and the deltas each is streamed in."""
        suffix = self.response_id.removeprefix("resp_")
        items: list[tuple[Event, list[str]]] = []
        if self.reasoning:
            summary = list(draw_tokens(self.seed + 1, self.reasoning))
            text = {"type": "summary_text", "text": "".join(summary)}
            items.append(({"id": f"rs_{suffix}", "type": "reasoning", "summary": [text]}, summary))
        tokens = self.tokens - self.reasoning
        tool = _function_tool(self.body or {})
        if tool is not None:
            pieces = _pieces(orjson.dumps(_example(tool.get("parameters") or {})).decode())
            call = {"id": f"fc_{suffix}", "type": "function_call", "status": "completed"}
            call |= {"arguments": "".join(pieces), "call_id": f"call_{suffix}"}
            items.append(({**call, "name": tool["name"]}, pieces))
            return items
        schema = _json_schema(self.body or {})
        pieces = list(draw_tokens(self.seed, tokens)) if schema is None else _pieces(schema)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": "".join(pieces)}
        message = {"id": f"msg_{suffix}", "type": "message", "status": "completed"}
        items.append(({**message, "content": [part], "role": "assistant"}, pieces))
        return items

    def output_tokens(self) -> int:
        return sum(len(deltas) for _, deltas in self.items())

    def response(self, status: str, output: list[Event], usage: Event | None) -> Event:
        body = self.body or {}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.response_id, "object": "response", "created_at": CREATED,
            "status": status, "background": False, "error": None,
            "incomplete_details": incomplete, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": self.model,
            "output": output, "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
        }  # fmt: skip

    def usage(self) -> Event:
        output = self.output_tokens()
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": min(self.cached, self.prompt_tokens)},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt_tokens + output,
        }

    def finished(self) -> Event:
        """The whole response, as the body of a non-stream answer and of a retrieval."""
        status = "completed" if self.finish == "stop" else "incomplete"
        return self.response(status, [item for item, _ in self.items()], self.usage())

    def events(self) -> ResponsesEvents:
        return _group(_Numbered(self).events())


class _Numbered:
    """Writes one response's events in order, numbering them."""

    def __init__(self, plan: ResponsePlan) -> None:
        self.plan, self.n = plan, 0
        self.out: list[tuple[bytes, bool]] = []  # (event bytes, is a delta)

    def add(self, kind: str, fields: Event, *, delta: bool = False) -> None:
        event = {"type": kind, "sequence_number": self.n, **fields}
        self.out.append((b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(event)), delta))
        self.n += 1

    def events(self) -> list[tuple[bytes, bool]]:
        plan = self.plan
        start = plan.response("in_progress", [], None)
        self.add("response.created", {"response": start})
        self.add("response.in_progress", {"response": start})
        for index, (item, deltas) in enumerate(plan.items()):
            self.item(index, item, deltas)
        final = plan.finished()
        self.add(f"response.{final['status']}", {"response": final})
        return self.out

    def item(self, index: int, item: Event, deltas: list[str]) -> None:
        at = {"item_id": item["id"], "output_index": index}
        kind = item["type"]
        empty: Event = {"summary": []} if kind == "reasoning" else {"status": "in_progress"}
        if kind == "message":
            empty |= {"content": [], "role": "assistant"}
        elif kind == "function_call":
            empty |= {"arguments": "", "call_id": item["call_id"], "name": item["name"]}
        self.add("response.output_item.added", {"output_index": index, "item": {**item, **empty}})
        if kind == "function_call":
            for piece in deltas:
                self.add(
                    "response.function_call_arguments.delta", {**at, "delta": piece}, delta=True
                )
            done = {**at, "arguments": item["arguments"], "name": item["name"]}
            self.add("response.function_call_arguments.done", done)
        else:
            self.text(kind, at, item, deltas)
        self.add("response.output_item.done", {"output_index": index, "item": item})

    def text(self, kind: str, at: Event, item: Event, deltas: list[str]) -> None:
        reasoning = kind == "reasoning"
        name = "reasoning_summary" if reasoning else "content"
        part = item["summary"][0] if reasoning else item["content"][0]
        where = {**at, "summary_index": 0} if reasoning else {**at, "content_index": 0}
        self.add(f"response.{name}_part.added", {**where, "part": {**part, "text": ""}})
        text_kind = "reasoning_summary_text" if reasoning else "output_text"
        extra: Event = {} if reasoning else {"logprobs": []}
        for piece in deltas:
            self.add(f"response.{text_kind}.delta", {**where, "delta": piece, **extra}, delta=True)
        self.add(f"response.{text_kind}.done", {**where, "text": part["text"], **extra})
        self.add(f"response.{name}_part.done", {**where, "part": part})


def _group(events: list[tuple[bytes, bool]]) -> ResponsesEvents:
    *body, (completed, _) = events
    first = next((i for i, (_, delta) in enumerate(body) if delta), len(body))
    writes: list[bytes] = []
    head: list[bytes] = []
    for event, delta in body[first:]:
        head.append(event)
        if delta:
            writes.append(b"".join(head))
            head.clear()
    role = b"".join(event for event, _ in body[:first])
    return ResponsesEvents(role, tuple(writes), b"".join(head), completed)


def plan_response(body: dict[str, Any], knobs: Knobs) -> ResponsePlan:
    seed, model = seed_and_model(body)
    prompt = body.get("input")
    if prompt is not None and not isinstance(prompt, str | list):
        raise Invalid("Invalid 'input': expected a string or an array", "input")
    cap = body.get("max_output_tokens")
    tokens = knobs.tokens + knobs.reasoning
    capped = min(tokens, cap) if isinstance(cap, int) and not isinstance(cap, bool) else tokens
    instructions = body.get("instructions")
    prompt_tokens = (
        count_prompt_tokens(prompt) if isinstance(prompt, list) else count_input_tokens(prompt)
    ) + (count_input_tokens(instructions) if isinstance(instructions, str) else 0)
    return ResponsePlan(
        seed=seed, model=model, tokens=capped, finish="length" if capped < tokens else "stop",
        stream=body.get("stream") is True, include_usage=True, prompt_tokens=prompt_tokens,
        api="responses", body=body, reasoning=min(knobs.reasoning, capped),
        cached=knobs.cached_tokens,
    )  # fmt: skip


def _function_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first function tool, unless the input already answers a call (or none is asked)."""
    prompt = body.get("input")
    items = prompt if isinstance(prompt, list) else []
    if body.get("tool_choice") == "none" or any(
        isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
    ):
        return None
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "function" and tool.get("name"):
            return tool
    return None


def _json_schema(body: dict[str, Any]) -> str | None:
    """With `text.format` json_schema: a JSON text that fits the schema."""
    text = body.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return None
    schema = form.get("schema")
    return orjson.dumps(_example(schema if isinstance(schema, dict) else {})).decode()


def _example(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A value that fits a (simple) JSON schema: `$ref`s into `$defs`, the first of an enum or
    anyOf, "mock" for strings."""
    root = root or schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _example(root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {}), root)
    if schema.get("enum"):
        return schema["enum"][0]
    if schema.get("anyOf"):
        return _example(schema["anyOf"][0], root)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: _example(sub, root) for name, sub in props.items()}
    scalars = {"array": [], "integer": 1, "number": 1.5, "boolean": True, "null": None}
    return scalars.get(kind, "mock") if isinstance(kind, str) else "mock"


def _pieces(text: str) -> list[str]:
    return [text[i : i + JSON_PIECE] for i in range(0, len(text), JSON_PIECE)] or [""]


class StoredResponses:
    """The responses this mock answered, by id, for the retrieval endpoints; `calls` notes
    each retrieval (method, path, Authorization) for tests. Bounded: the oldest go first."""

    def __init__(self, most: int = 10_000) -> None:
        self._most = most
        self._by_id: dict[str, tuple[Event, list[Event]]] = {}
        self.calls: list[tuple[str, str, str]] = []

    def keep(self, plan: ResponsePlan) -> None:
        prompt = (plan.body or {}).get("input")
        if isinstance(prompt, str):
            prompt = [{"type": "message", "role": "user", "content": prompt}]
        items = [
            {"id": f"item_{i}", **item} if "id" not in item else item
            for i, item in enumerate(prompt if isinstance(prompt, list) else [])
            if isinstance(item, dict)
        ]
        self._by_id.pop(plan.response_id, None)
        self._by_id[plan.response_id] = (plan.finished(), items)
        if len(self._by_id) > self._most:
            del self._by_id[next(iter(self._by_id))]

    def knows(self, response_id: object) -> bool:
        return response_id in self._by_id

    def answer(self, method: str, path: str, authorization: str) -> tuple[int, bytes]:
        """GET/DELETE `/v1/responses/{id}`, GET `.../input_items`, POST `.../cancel`."""
        self.calls.append((method, path, authorization))
        rid, _, rest = path.removeprefix("/v1/responses/").partition("/")
        stored = self._by_id.get(rid)
        if stored is None:
            message = f"Response with id '{rid}' not found."
            return 404, error_body(message, "invalid_request_error", code="not_found")
        response, items = stored
        if (method, rest) == ("GET", ""):
            return 200, orjson.dumps(response)
        if (method, rest) == ("DELETE", ""):
            del self._by_id[rid]
            return 200, orjson.dumps({"id": rid, "object": "response", "deleted": True})
        if (method, rest) == ("GET", "input_items"):
            first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
            page = {"object": "list", "data": items, "first_id": first, "last_id": last}
            return 200, orjson.dumps({**page, "has_more": False})
        if (method, rest) == ("POST", "cancel"):
            return 200, orjson.dumps({**response, "status": "cancelled"})
        message = f"Unknown request URL: {method} {path}"
        return 404, error_body(message, "invalid_request_error", code="not_found")
