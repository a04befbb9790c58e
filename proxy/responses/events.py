"""Chat completion chunks → Responses API stream events (pure, stateful): the one place where
the proxy writes stream events itself rather than relaying the upstream's bytes.

`StreamTranslator.feed(chunk)` takes one parsed chat chunk and returns the bytes of the events
it makes (often none: a role-only or empty delta); `done()` closes the open items and writes
`response.completed` (or `response.incomplete`) with the whole response and its usage;
`error(exc)` writes the `error` event a mid-stream failure ends with. The events:

    response.created, response.in_progress                          on the first chunk
    reasoning:  output_item.added, reasoning_summary_part.added,
                reasoning_summary_text.delta…, reasoning_summary_text.done,
                reasoning_summary_part.done, output_item.done
    message:    output_item.added, content_part.added, output_text.delta… (refusal.delta…),
                output_text.done, content_part.done, output_item.done
    function:   output_item.added, function_call_arguments.delta…,
                function_call_arguments.done, output_item.done        one per tool-call index

Reasoning and message items follow each other as the deltas switch; function calls stay open
until the end (parallel calls may interleave by index) and close in output order. Each event
has a `sequence_number` counting from 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.errors import ProxyError
from proxy.responses.body import reasoning_of
from proxy.responses.items import (
    Shell,
    function_call_item,
    message_item,
    new_id,
    outcome,
    reasoning_item,
    refusal_part,
    summary_part,
    text_part,
    usage_of,
)

_PART = {"output_text": text_part, "refusal": refusal_part}
_DELTA = {"output_text": "response.output_text.delta", "refusal": "response.refusal.delta"}


class _Item:
    """One open output item: its place, id and the text (or arguments) so far."""

    def __init__(self, output_index: int, item_id: str) -> None:
        self.output_index = output_index
        self.id = item_id
        self.parts: list[tuple[str, list[str]]] = []  # message: (kind, text pieces) per part
        self.text: list[str] = []  # reasoning text, or function-call arguments
        self.call_id = ""
        self.name = ""


class StreamTranslator:
    def __init__(self, shell: Shell, usage: Mapping[str, Any] | None = None) -> None:
        """`usage`: the chat usage known before the stream (a whole answer turned into a
        stream); a usage chunk in the stream replaces it."""
        self._shell = shell
        self._sequence = 0
        self._started = False
        self._finished = False
        self._next_index = 0  # output_index of the next item opened
        self._output: dict[int, dict[str, Any]] = {}  # closed items, by output index
        self._reasoning: _Item | None = None
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}  # by the chat tool-call index
        self._finish_reason: Any = None
        self._usage: dict[str, Any] | None = usage_of(usage)
        self._out: list[bytes] = []
        self._texts: list[str] = []  # every delta's text, for an estimate without usage

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage the chat stream reported, in Responses terms."""
        return self._usage

    @property
    def text(self) -> str:
        """All the answer's text so far: reasoning, message, refusal and call arguments."""
        return "".join(self._texts)

    @property
    def answered(self) -> bool:
        """The chat stream said how it finished (a finish_reason came)."""
        return self._finish_reason is not None

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        if self._finished:
            return b""
        if not self._started:
            self._start(chunk)
        if isinstance(chunk.get("error"), Mapping) and not chunk.get("choices"):
            return self._take() + self._error_event(chunk["error"])
        if isinstance(chunk.get("usage"), Mapping):
            self._usage = usage_of(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if isinstance(choice, Mapping):
                self._choice(choice)
        return self._take()

    def done(self) -> bytes:
        """At `[DONE]` (or the end of a stream without one)."""
        if self._finished:
            return b""
        if not self._started:
            self._start({})
        status, details = outcome(self._finish_reason)
        self._close_reasoning(status)
        self._close_message(status)
        for call in sorted(self._calls.values(), key=lambda item: item.output_index):
            self._close_call(call, status)
        self._calls.clear()
        output = [self._output[index] for index in sorted(self._output)]
        response = self._shell.response(status, output, self._usage, details)
        self._emit(f"response.{status}", response=response)
        self._finished = True
        return self._take()

    def error(self, exc: ProxyError) -> bytes:
        """The event a stream ends with when it fails after the first event."""
        if self._finished:
            return b""
        error = {"message": exc.message, "code": exc.code, "param": exc.param}
        return self._take() + self._error_event(error)

    def _error_event(self, error: Mapping[str, Any]) -> bytes:
        message = error.get("message")
        self._emit(
            "error",
            code=error.get("code") if isinstance(error.get("code"), str) else None,
            message=message if isinstance(message, str) else "upstream error",
            param=error.get("param") if isinstance(error.get("param"), str) else None,
        )
        self._finished = True
        return self._take()

    def _start(self, chunk: Mapping[str, Any]) -> None:
        self._started = True
        self._shell.seen(chunk)
        response = self._shell.response("in_progress", [])
        self._emit("response.created", response=response)
        self._emit("response.in_progress", response=response)

    def _choice(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            reasoning = reasoning_of(delta)
            if reasoning:
                self._reasoning_delta(reasoning)
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                if isinstance(delta.get(key), str) and delta[key]:
                    self._message_delta(kind, delta[key])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, Mapping):
                    self._call_delta(call)
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]

    # reasoning: one summary part per item

    def _reasoning_delta(self, text: str) -> None:
        self._close_message("completed")
        item = self._reasoning
        if item is None:
            item = self._reasoning = self._open(new_id("rs"))
            self._emit_added(item, reasoning_item(item.id, "", "in_progress"))
            self._emit_at(
                item,
                "response.reasoning_summary_part.added",
                summary_index=0,
                part=summary_part(""),
            )
        item.text.append(text)
        self._emit_at(item, "response.reasoning_summary_text.delta", summary_index=0, delta=text)

    def _close_reasoning(self, status: str) -> None:
        item, self._reasoning = self._reasoning, None
        if item is None:
            return
        text = "".join(item.text)
        self._emit_at(item, "response.reasoning_summary_text.done", summary_index=0, text=text)
        self._emit_at(
            item, "response.reasoning_summary_part.done", summary_index=0, part=summary_part(text)
        )
        self._emit_done(item, reasoning_item(item.id, text, status))

    # message: an output_text part, and a refusal part when the model refuses

    def _message_delta(self, kind: str, text: str) -> None:
        self._close_reasoning("completed")
        item = self._message
        if item is None:
            item = self._message = self._open(new_id("msg"))
            self._emit_added(item, message_item(item.id, [], "in_progress"))
        if not item.parts or item.parts[-1][0] != kind:
            self._close_part(item)
            item.parts.append((kind, []))
            self._emit_at(
                item,
                "response.content_part.added",
                content_index=len(item.parts) - 1,
                part=_PART[kind](""),
            )
        item.parts[-1][1].append(text)
        extra: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
        self._emit_at(item, _DELTA[kind], content_index=len(item.parts) - 1, delta=text, **extra)

    def _close_part(self, item: _Item) -> None:
        if not item.parts:
            return
        kind, pieces = item.parts[-1]
        text, index = "".join(pieces), len(item.parts) - 1
        if kind == "output_text":
            self._emit_at(
                item, "response.output_text.done", content_index=index, text=text, logprobs=[]
            )
        else:
            self._emit_at(item, "response.refusal.done", content_index=index, refusal=text)
        self._emit_at(
            item, "response.content_part.done", content_index=index, part=_PART[kind](text)
        )

    def _close_message(self, status: str) -> None:
        item, self._message = self._message, None
        if item is None:
            return
        self._close_part(item)
        parts = [_PART[kind]("".join(pieces)) for kind, pieces in item.parts]
        self._emit_done(item, message_item(item.id, parts, status))

    # function calls: one item per chat tool-call index

    def _call_delta(self, delta: Mapping[str, Any]) -> None:
        index = delta.get("index")
        index = index if isinstance(index, int) else len(self._calls)
        function = delta.get("function")
        function = function if isinstance(function, Mapping) else {}
        item = self._calls.get(index)
        if item is None:
            self._close_reasoning("completed")
            self._close_message("completed")
            item = self._calls[index] = self._open(new_id("fc"))
            item.call_id = delta.get("id") or new_id("call")
            item.name = function.get("name") or ""
            self._emit_added(
                item, function_call_item(item.id, item.call_id, item.name, "", "in_progress")
            )
        elif isinstance(function.get("name"), str) and not item.name:
            item.name = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.text.append(arguments)
            self._emit_at(item, "response.function_call_arguments.delta", delta=arguments)

    def _close_call(self, item: _Item, status: str) -> None:
        arguments = "".join(item.text)
        self._emit_at(item, "response.function_call_arguments.done", arguments=arguments)
        self._emit_done(
            item, function_call_item(item.id, item.call_id, item.name, arguments, status)
        )

    # writing events

    def _open(self, item_id: str) -> _Item:
        self._next_index += 1
        return _Item(self._next_index - 1, item_id)

    def _emit_added(self, item: _Item, shape: dict[str, Any]) -> None:
        self._emit("response.output_item.added", output_index=item.output_index, item=shape)

    def _emit_done(self, item: _Item, shape: dict[str, Any]) -> None:
        self._emit("response.output_item.done", output_index=item.output_index, item=shape)
        self._output[item.output_index] = shape

    def _emit_at(self, item: _Item, kind: str, **fields: Any) -> None:
        if "delta" in fields:
            self._texts.append(fields["delta"])
        self._emit(kind, item_id=item.id, output_index=item.output_index, **fields)

    def _emit(self, kind: str, **fields: Any) -> None:
        data = orjson.dumps({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        self._out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

    def _take(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out
