"""The tee's stream readers (pure), one per way of metering a stream, all framing events with
`proxy.sse`'s blank lines and reading them with its `data:`-line joiner:

- `UsageEventFinder` finds the usage event in relayed bytes without parsing the rest;
- `UsageEventDropper` takes the usage event the proxy asked for out of the stream;
- `ContentCollector` parses every event for the answer's text, for a token estimate.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.metering.estimate import choice_texts
from proxy.metering.reported import usage_from_json
from proxy.record import Usage
from proxy.sse import (
    BLANK_LINES,
    DONE,
    EventBuffer,
    EventSplitter,
    choices_of,
    event_data,
    event_ends,
    last_blank_line_end,
    parse,
)

# A non-null usage object, compact (OpenAI, orjson) or after ": " (Python's json.dumps).
# `"usage":null`, which OpenAI puts in every chunk when include_usage is on, matches neither.
USAGE_MARKERS = (b'"usage":{', b'"usage": {')
# Either marker in one pass: a compiled pattern (its literal prefix found by a fast search)
# costs about half of two `in` scans per chunk, with or without OpenAI's `"usage":null`.
_MARKED = re.compile(rb'"usage": ?\{').search
_USAGE_KEY = b'"usage"'
_OVERLAP = max(map(len, (*USAGE_MARKERS, *BLANK_LINES))) - 1
_BLANKS = b" \t\r\n"
# Past this, an unfinished event is cut to its tail: it bounds the tee's memory when an
# upstream sends a huge event or no boundaries at all (a cut event just fails to parse).
MAX_EVENT_BYTES = 1 << 20


class UsageEventFinder:
    """Feed it every relayed SSE chunk in order; it keeps the last non-null usage object.

    Most chunks cost one search for the markers and no Python work per event: only a chunk
    holding a usage marker is walked event by event (`data: [DONE]` is the relay's to
    see, not this reader's). The bytes of an unfinished
    event are carried over, so markers, event ends and UTF-8 characters split across chunks
    are seen whole. The usage event is kept as bytes and parsed once, when `usage` is read.
    """

    def __init__(self) -> None:
        self.parsed = 0  # events JSON-parsed so far: the cost this scanner exists to avoid
        self.events = 0  # `data:` lines fed (see `Tee`)
        self._carry = bytearray()  # the unfinished event's bytes so far
        self._carry_marked = False  # ...and whether they hold a marker
        self._candidate: bytes | None = None
        self._usage: Usage | None = None

    @property
    def usage(self) -> Usage | None:
        if self._candidate is not None:
            parsed = _parse_usage_event(self._candidate)
            self.parsed += 1
            self._candidate = None
            if parsed is not None:
                self._usage = parsed
        return self._usage

    def feed(self, chunk: bytes) -> bytes:
        """Scans the chunk; returns it unchanged, for a tee that relays it in the same call."""
        self.events += chunk.count(b"data:")
        if self._carry:
            # Everything before `resume` was searched already; a marker or boundary may
            # straddle the join, hence the overlap.
            resume = max(len(self._carry) - _OVERLAP, 0)
            self._carry += chunk
            data: bytes | bytearray = self._carry
        else:
            resume, data = 0, chunk
        if self._carry_marked or self._marked(data, resume):
            consumed = self._walk(data, resume)
            self._carry_marked = self._marked(data, consumed)
        elif data.endswith(BLANK_LINES):  # the usual chunk: whole events
            consumed = len(data)  # (a LF that completes a last CR comes as blank bytes next)
        else:
            consumed = last_blank_line_end(data, resume)
        if data is self._carry:
            del self._carry[:consumed]
        elif consumed < len(data):
            self._carry += memoryview(chunk)[consumed:]
        if len(self._carry) > MAX_EVENT_BYTES:
            del self._carry[:-_OVERLAP]
        return chunk

    def flush(self) -> None:
        """End of stream: an unterminated last event still counts."""
        if self._carry:
            self._event(self._carry, 0, len(self._carry))
            self._carry.clear()
        self._carry_marked = False

    def _marked(self, data: bytes | bytearray, start: int) -> bool:
        return _MARKED(data, start) is not None

    def _walk(self, data: bytes | bytearray, resume: int) -> int:
        """Handles each complete event in `data`; returns where the unfinished rest starts."""
        start = 0
        for end, after in event_ends(data, max(resume - _OVERLAP, 0)):
            self._event(data, start, end)
            start = after
        return start

    def _event(self, data: bytes | bytearray, start: int, end: int) -> None:
        key = data.find(_USAGE_KEY, start, end)
        while key != -1:
            value = key + len(_USAGE_KEY)
            while value < end and data[value] in _BLANKS:
                value += 1
            if value < end and data[value] == 0x3A:  # ":" — so "usage" is a key, not a value
                value += 1
                while value < end and data[value] in _BLANKS:
                    value += 1
                if value < end and data[value] == 0x7B:  # "{": null usage is skipped unparsed
                    self._candidate = bytes(data[start:end])
                    return
            key = data.find(_USAGE_KEY, key + 1, end)


def _parse_usage_event(event: bytes) -> Usage | None:
    try:
        payload = orjson.loads(event_data(event) or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if usage is None and isinstance(response := payload.get("response"), dict):
        usage = response.get("usage")  # the Responses API's `response.completed`
    return usage_from_json(usage) if isinstance(usage, dict) else None


class UsageEventDropper:
    """Takes the usage-only event out of a stream; every other byte passes unchanged.

    Used when the proxy asked the upstream for usage that the client did not ask for. Bytes
    after the last complete event are held until that event completes, so a usage event
    split across chunks is never half-forwarded; event-aligned chunks pass straight through.
    """

    __slots__ = ("_buffer", "events", "usage")

    def __init__(self) -> None:
        self._buffer = EventBuffer()
        self.usage: dict[str, Any] | None = None
        self.events = 0  # `data:` lines fed (see `Tee`)

    def feed(self, chunk: bytes) -> bytes:
        # The relay's hot path: a few C-level scans, `_has_usage` inlined.
        self.events += chunk.count(b"data:")
        if not self._buffer.held and chunk.endswith(_WHOLE) and _MARKED(chunk) is None:
            return chunk  # the common case: whole events, none of them the usage event
        return self._drop(*self._buffer.take(chunk))

    def flush(self) -> bytes:
        """End of stream: the bytes still held (a usage event among them still taken out)."""
        return self._drop(*self._buffer.take(b"", final=True)) + self._buffer.release()

    def _drop(self, events: list[tuple[bytes, bytes]], complete: bytes) -> bytes:
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


# Blank lines that end a chunk for certain: a final CR might still be the first half of a CRLF.
_WHOLE = tuple(blank for blank in BLANK_LINES if blank.endswith(b"\n"))


def _has_usage(data: bytes) -> bool:
    return _MARKED(data) is not None


class ContentCollector:
    """Collects the answer's text and usage, parsing every event: the slow path, used only
    when the upstream will not report usage and a token estimate is needed. The text is
    `choice_texts` of every delta, kept per choice, so it equals that of the same answer
    sent whole."""

    __slots__ = ("_by_choice", "_splitter", "done", "usage")

    def __init__(self) -> None:
        self._splitter = EventSplitter()  # relayed bytes, cut into events
        self._by_choice: dict[int, list[str]] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Observes the complete events in relayed bytes; returns the chunk unchanged."""
        for event in self._splitter.feed(chunk):
            self.observe(event)
        return chunk

    def flush(self) -> None:
        """End of stream: see `EventSplitter.flush`."""
        for event in self._splitter.flush():
            self.observe(event)

    def observe(self, event: bytes) -> None:
        data = event_data(event)
        if data is None:
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.done = self.done or data.strip() == DONE
            return
        if not isinstance(payload, dict):
            return
        if isinstance(usage := payload.get("usage"), dict):
            self.usage = usage
        for choice in choices_of(payload):
            if texts := choice_texts(choice):
                index = choice.get("index")
                self._by_choice.setdefault(index if isinstance(index, int) else 0, []).extend(texts)

    @property
    def parts(self) -> list[str]:
        """The text pieces, choice by choice."""
        return [part for index in sorted(self._by_choice) for part in self._by_choice[index]]

    @property
    def text(self) -> str:
        return "".join(self.parts)
