"""Server-Sent Events, read incrementally (pure).

The relay never parses what it forwards after the first content event; these helpers serve
the few places that must look inside the stream: deciding when an answer has really begun
(before which nothing is forwarded and a fallback is still possible), and the metering
readers (`proxy.metering.scan`), which frame events with the same blank lines and read their
`data:` lines with the same joiner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import orjson

Kind = Literal["content", "done", "error", "other"]
# An SSE line ends with CRLF, LF or a lone CR (WHATWG HTML, "Server-sent events", end-of-line),
# and an event ends with a blank line: two line endings in a row, which is any two of those
# but a lone CR then LF (that is one CRLF). Every reader of event boundaries frames by this set.
BLANK_LINES = (b"\r\n\r\n", b"\r\n\r", b"\r\n\n", b"\r\r\n", b"\n\r\n", b"\r\r", b"\n\r", b"\n\n")
# Where two line endings meet: every blank line holds one of these pairs, and each is in one;
# a CR before a meeting LF, or a LF after a meeting CR, belongs to it (`bytes.find` is far
# faster than a regular expression here).
_MEETS = tuple(sorted({b[i : i + 2] for b in BLANK_LINES for i in range(len(b) - 1)} - {b"\r\n"}))
_CR = 0x0D
DONE = b"[DONE]"


# Bytes at the end of what was scanned that may begin a blank line the next bytes complete:
# a resumed scan starts this far back, never at the start of a held event (linear cost).
_RESCAN = max(map(len, BLANK_LINES)) - 1


class EventSplitter:
    """Cuts a byte stream into complete SSE events (raw, without their blank line).

    An unfinished event is held in a bytearray that grows in place, and each chunk is scanned
    once (plus `_RESCAN` bytes before it): a huge event fed in small reads costs time linear
    in its size, not quadratic."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        end = len(chunk) - 2  # the usual chunk is exactly one whole event: no scan needed
        if end >= 0 and not self._pending and chunk.find(b"\n\n") == end and b"\r" not in chunk:
            return [chunk[:end]]
        events, _ = _take(self._pending, chunk)
        return [event for event, _ in events]

    def flush(self) -> list[bytes]:
        """End of stream: an event whose blank line ended the bytes with a CR is complete."""
        events, _ = _take(self._pending, b"", final=True)
        self._pending.clear()
        return [event for event, _ in events]


class EventBuffer:
    """Holds the bytes after the last complete event until that event completes: for readers
    that relay whole events only (to take one out, or to add one between two). Linear in
    the bytes fed, as `EventSplitter`."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = bytearray()

    def take(self, chunk: bytes, *, final: bool = False) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The complete events in the held bytes and chunk, each with its blank line, and all
        their bytes; the rest is held (`final`: the stream ended, as in `event_ends`)."""
        return _take(self.held, chunk, final=final)

    def release(self) -> bytes:
        """End of stream: whatever is still held, as it is."""
        held = bytes(self.held)
        self.held.clear()
        return held


def _take(
    held: bytearray, chunk: bytes, *, final: bool = False
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The complete events in held + chunk and their bytes; the rest stays in `held`. Held
    bytes were scanned already: only their last `_RESCAN` are scanned again."""
    if not held:  # no copy of the chunk unless part of it must be held
        events, end = split_complete(chunk, final=final)
        if end < len(chunk):
            held += memoryview(chunk)[end:]
            return events, chunk[:end]
        return events, chunk
    resume = max(len(held) - _RESCAN, 0)
    held += chunk
    events, end = split_complete(held, resume, final=final)
    complete = bytes(held[:end])
    del held[:end]
    return events, complete


def event_ends(
    data: bytes | bytearray, start: int = 0, *, final: bool = False
) -> Iterator[tuple[int, int]]:
    """For each complete event in data from `start`: where it ends and where, after its blank
    line, the next one starts. Scanning forward (never rfind) frames runs of blank lines the
    same way every time. A blank line that ends the bytes with a CR is complete only when
    they are `final`: otherwise the next byte may be its LF, and it waits for that byte."""
    if data.find(b"\r", start) == -1:  # the usual stream: LF only
        at = data.find(b"\n\n", start)
        while at != -1:
            yield at, at + 2
            at = data.find(b"\n\n", at + 2)
        return
    size, pos = len(data), start
    ahead = [data.find(pair, start) for pair in _MEETS]  # each pair's next place, or -1
    while (meet := min((at for at in ahead if at != -1), default=-1)) != -1:
        end, after = meet, meet + 2
        if meet > pos and data[meet - 1 : meet + 1] == b"\r\n":
            end -= 1
        if data[after - 1] == _CR:
            if after == size and not final:
                return
            after += data[after : after + 1] == b"\n"
        yield end, after
        pos = after
        ahead = [
            data.find(pair, pos) if -1 < at < pos else at
            for at, pair in zip(ahead, _MEETS, strict=True)
        ]


def last_blank_line_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the bytes after the last blank line in data[start:] begin; 0 when it has none.
    A few C-level searches from the end, for a reader that only carries the unfinished rest:
    within a run of blank lines it may end one line ending later than `event_ends`."""
    meet = max(data.rfind(pair, start) for pair in _MEETS)
    if meet < 0:
        return 0
    end = meet + 2
    return end + 1 if data[end - 1] == _CR and data[end : end + 1] == b"\n" else end


def split_complete(
    data: bytes | bytearray, resume: int = 0, *, final: bool = False
) -> tuple[list[tuple[bytes, bytes]], int]:
    """The complete events in data, each with its blank line, and where the incomplete rest
    starts (`final`: as in `event_ends`). `resume`: data before it holds no event's end
    (it was scanned before), so the scan starts there; events still start at 0."""
    out: list[tuple[bytes, bytes]] = []
    start = 0
    for end, after in event_ends(data, resume, final=final):
        out.append((bytes(data[start:end]), bytes(data[end:after])))
        start = after
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
    a usage-only event. Role-only chunks, empty deltas and keep-alive comments are "other": an
    upstream that sends only those has not started answering.
    """
    return _parsed(event, _kind)


def parse_responses(event: bytes) -> tuple[Kind, dict[str, Any] | None]:
    """`parse` for the Responses API's events (`event:` lines, a `type` in the data): content
    is a non-empty text, refusal, reasoning or function-call-arguments delta (or its `.done`),
    an output item added other than an empty message or reasoning item (a function call,
    say), a finished output item, or the response's end (`response.completed`/`incomplete`).
    `response.created`, `response.in_progress`, `response.content_part.added` and comments are
    not; `error` and `response.failed` are errors."""
    return _parsed(event, _responses_kind)


def _parsed(
    event: bytes, judge: Callable[[dict[str, Any]], Kind]
) -> tuple[Kind, dict[str, Any] | None]:
    data = event_data(event)
    if data is None:
        return "other", None
    if data.strip() == DONE:
        return "done", None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "other", None
    if not isinstance(payload, dict):
        return "other", None
    return judge(payload), payload


_RESPONSES_DELTAS = frozenset(
    f"response.{part}.delta"
    for part in (
        "output_text", "refusal", "reasoning_summary_text", "reasoning_text",
        "function_call_arguments", "custom_tool_call_input", "audio", "audio.transcript",
    )
)  # fmt: skip
_RESPONSES_CONTENT = frozenset(
    {d.removesuffix(".delta") + ".done" for d in _RESPONSES_DELTAS}
    | {"response.output_item.done", "response.completed", "response.incomplete"}
)
_RESPONSES_ERRORS = frozenset({"error", "response.failed"})
_EMPTY_ITEMS = frozenset({"message", "reasoning"})  # added empty: their text comes after


def _responses_kind(payload: dict[str, Any]) -> Kind:
    kind = payload.get("type")
    if not isinstance(kind, str):
        return "error" if payload.get("error") is not None else "other"
    if kind in _RESPONSES_DELTAS:
        return "content" if payload.get("delta") else "other"
    if kind in _RESPONSES_CONTENT:
        return "content"
    if kind == "response.output_item.added":
        item = payload.get("item")
        return (
            "content"
            if isinstance(item, dict) and item.get("type") not in _EMPTY_ITEMS
            else "other"
        )
    return "error" if kind in _RESPONSES_ERRORS else "other"


def response_id(payload: dict[str, Any]) -> str | None:
    """The id in a Responses stream's `response.created` event, else None."""
    response = payload.get("response") if payload.get("type") == "response.created" else None
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) else None


_SEQUENCE = b'"sequence_number":'


def responses_error_event(code: str | None, message: str, param: str | None, after: bytes) -> bytes:
    """The Responses API's own error event (openai-python's `ResponseErrorEvent`), numbered
    one past the last `sequence_number` in `after` (the bytes relayed last)."""
    at, sequence = after.rfind(_SEQUENCE), 0
    if at != -1:
        digits = after[at + len(_SEQUENCE) :].lstrip()[:20]
        number = digits[: len(digits) - len(digits.lstrip(b"0123456789"))]
        sequence = int(number) + 1 if number else 0
    event = {
        "type": "error",
        "code": code,
        "message": message,
        "param": param,
        "sequence_number": sequence,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def _kind(payload: dict[str, Any]) -> Kind:
    if payload.get("error") is not None:
        return "error"
    choices = choices_of(payload)
    # A usage-only chunk ends an answer; a chunk with choices is judged by them, usage or
    # not (vLLM's continuous_usage_stats puts running usage on every chunk, the role one too).
    if payload.get("usage") and not choices:
        return "content"
    for choice in choices:
        if isinstance(choice, dict) and (choice.get("finish_reason") or _has_content(choice)):
            return "content"
    return "other"


def choices_of(payload: dict[str, Any]) -> list[Any]:
    """A chunk's or completion's choices; none when they are missing or no list."""
    choices = payload.get("choices")
    return choices if isinstance(choices, list) else []


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
