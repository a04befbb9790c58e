"""Server-Sent Events, read incrementally (pure).

The relay never parses what it forwards after the first content event; these helpers serve
the few places that must look inside the stream: deciding when an answer has really begun
(before which nothing is forwarded and a fallback is still possible), taking out the usage
event the proxy requested on the client's behalf, and collecting text for a token estimate
when an upstream reports no usage at all.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

Kind = Literal["content", "done", "error", "other"]
_ENDS = (b"\n\n", b"\r\n\r\n")
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')


class EventSplitter:
    """Cuts a byte stream into complete SSE events (raw, without their blank line)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        end = len(chunk) - 2  # the usual chunk is exactly one whole event: no scan needed
        if end >= 0 and not self._pending and chunk.find(b"\n\n") == end and b"\r" not in chunk:
            return [chunk[:end]]
        data = self._pending + chunk if self._pending else chunk
        events, end = split_complete(data)
        self._pending = data[end:]
        return [event for event, _ in events]


def _next_end(data: bytes, start: int) -> tuple[int, int]:
    best, width = -1, 0
    for end in _ENDS:
        i = data.find(end, start)
        if i >= 0 and (best < 0 or i < best):
            best, width = i, len(end)
    return best, width


def split_complete(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The complete events in data, each with its ending, and where the incomplete rest
    starts. Scanning forward (never rfind) keeps runs of blank lines framed consistently."""
    out: list[tuple[bytes, bytes]] = []
    start = 0
    while (found := _next_end(data, start))[0] >= 0:
        end, width = found
        out.append((data[start:end], data[end : end + width]))
        start = end + width
    return out, start


def event_data(event: bytes) -> bytes | None:
    """The event's `data:` lines joined by newlines; None for comments and empty events."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:]  # the usual shape: one line
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)


def parse(event: bytes) -> tuple[Kind, dict[str, Any] | None]:
    """What an event means for the proxy, and its JSON payload when it has one.

    "content" is the first sign of a real answer: a delta with text, reasoning, a tool or
    function call or a refusal, or a finish_reason (an empty answer is still an answer), or
    a usage event. Role-only chunks, empty deltas and keep-alive comments are "other": an
    upstream that sends only those has not started answering.
    """
    data = event_data(event)
    if data is None:
        return "other", None
    if data.strip() == b"[DONE]":
        return "done", None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "other", None
    if not isinstance(payload, dict):
        return "other", None
    return _kind(payload), payload


def _kind(payload: dict[str, Any]) -> Kind:
    if payload.get("error") is not None:
        return "error"
    if payload.get("usage"):
        return "content"
    for choice in payload.get("choices") or ():
        if isinstance(choice, dict) and (choice.get("finish_reason") or _has_content(choice)):
            return "content"
    return "other"


def _has_content(choice: dict[str, Any]) -> bool:
    if choice.get("text"):  # the completions API's chunk
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return any(
        delta.get(key)
        for key in ("content", "reasoning_content", "tool_calls", "function_call", "refusal")
    )


class UsageEventDropper:
    """Takes the usage-only event out of a stream; every other byte passes unchanged.

    Used when the proxy asked the upstream for usage that the client did not ask for. Bytes
    after the last complete event are held until that event completes, so a usage event
    split across chunks is never half-forwarded; event-aligned chunks pass straight through.
    """

    __slots__ = ("_held", "events", "usage")

    def __init__(self) -> None:
        self._held = b""
        self.usage: dict[str, Any] | None = None
        self.events = 0  # `data:` lines seen: a cut stream's only measure of its output

    def feed(self, chunk: bytes) -> bytes:
        # The relay's hot path: a few C-level scans, `_has_usage` inlined.
        self.events += chunk.count(b"data:")
        if (
            not self._held
            and chunk.endswith(b"\n\n")
            and _USAGE_MARKERS[0] not in chunk
            and _USAGE_MARKERS[1] not in chunk
        ):
            return chunk  # the common case: whole events, none of them the usage event
        data = self._held + chunk if self._held else chunk
        events, end = split_complete(data)
        complete, self._held = (data, b"") if end == len(data) else (data[:end], data[end:])
        if not _has_usage(complete):
            return complete
        kept: list[bytes] = []
        for event, ending in events:
            _, payload = parse(event)
            if payload is not None and isinstance(payload.get("usage"), dict):
                self.usage = payload["usage"]
                if not payload.get("choices"):
                    continue  # the usage-only event: the client did not ask for it
            kept.append(event + ending)
        return b"".join(kept)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def _has_usage(data: bytes) -> bool:
    return _USAGE_MARKERS[0] in data or _USAGE_MARKERS[1] in data


class ContentCollector:
    """Collects the answer's text and usage, parsing every event: the slow path, used only
    when the upstream will not report usage and a token estimate is needed."""

    __slots__ = ("_splitter", "done", "parts", "usage")

    def __init__(self) -> None:
        self._splitter = EventSplitter()  # relayed bytes, cut into events
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        """Observes the complete events in relayed bytes (the caller forwards them as is)."""
        for event in self._splitter.feed(chunk):
            self.observe(event)

    def observe(self, event: bytes) -> None:
        data = event_data(event)
        if data is None:
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.done = self.done or data.strip() == b"[DONE]"
            return
        if not isinstance(payload, dict):
            return
        if isinstance(usage := payload.get("usage"), dict):
            self.usage = usage
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self.parts.extend(_texts(delta))
            elif isinstance(choice.get("text"), str):  # the completions API's chunk
                self.parts.append(choice["text"])

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _texts(delta: dict[str, Any]) -> list[str]:
    """What the model generated in a delta: text, reasoning, and tool-call arguments."""
    texts = [delta[k] for k in ("content", "reasoning_content") if isinstance(delta.get(k), str)]
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.extend(v for k in ("name", "arguments") if isinstance(v := function.get(k), str))
    return texts


def usage_chunk(template: dict[str, Any], usage: dict[str, int]) -> bytes:
    """An OpenAI-shaped usage-only chunk, for a client that asked for usage the upstream
    could not stream (stream_options stripped); docs/BEHAVIOUR.md lists every addition."""
    fields = {k: template[k] for k in ("id", "object", "created", "model") if k in template}
    return b"data: " + orjson.dumps({**fields, "choices": [], "usage": usage}) + b"\n\n"


def completion_to_sse(body: bytes, *, with_usage: bool) -> bytes | None:
    """A JSON chat completion (some upstreams answer `stream: true` that way) as the SSE
    stream the client asked for: one chunk per choice, usage if asked, then [DONE].
    None when the body is not a chat completion."""
    try:
        completion = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        return None
    head = {k: completion[k] for k in ("id", "created", "model") if k in completion}
    # The completions API streams `text_completion` objects whose choices carry `text`.
    legacy = completion.get("object") == "text_completion"
    head["object"] = "text_completion" if legacy else "chat.completion.chunk"
    out: list[bytes] = []
    for i, choice in enumerate(completion["choices"]):
        part = choice if isinstance(choice, dict) else {}
        finish = part.get("finish_reason")
        if legacy:
            piece = {"index": i, "text": part.get("text", ""), "finish_reason": finish}
        else:
            message = part.get("message")
            delta = message if isinstance(message, dict) else {}
            piece = {"index": i, "delta": delta, "finish_reason": finish}
        out.append(b"data: " + orjson.dumps({**head, "choices": [piece]}) + b"\n\n")
    if with_usage and isinstance(completion.get("usage"), dict):
        out.append(usage_chunk(head, completion["usage"]))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)
