"""The streaming tee's usage scanner: raw relayed bytes searched with `bytes.find`, only the
one event that carries usage parsed (pure)."""

from __future__ import annotations

import orjson

from proxy.metering.reported import usage_from_json
from proxy.record import Usage

# A non-null usage object, compact (OpenAI, orjson) or after ": " (Python's json.dumps).
# `"usage":null`, which OpenAI puts in every chunk when include_usage is on, matches neither.
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_USAGE_KEY = b'"usage"'
_DONE = b"[DONE]"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")  # an empty line, in each of SSE's line endings
_OVERLAP = max(map(len, (*_USAGE_MARKERS, _DONE, *_BOUNDARIES))) - 1
_BLANKS = b" \t\r\n"
# Past this, an unfinished event is cut to its tail: it bounds the tee's memory when an
# upstream sends a huge event or no boundaries at all (a cut event just fails to parse).
MAX_EVENT_BYTES = 1 << 20


class UsageEventFinder:
    """Feed it every relayed SSE chunk in order; it keeps the last non-null usage object.

    Most chunks cost a few `bytes.find` calls and no Python work per event: only a chunk
    holding a usage marker or `[DONE]` is walked event by event. The bytes of an unfinished
    event are carried over, so markers, event ends and UTF-8 characters split across chunks
    are seen whole. The usage event is kept as bytes and parsed once, when `usage` is read.
    """

    def __init__(self) -> None:
        self.done = False
        self.parsed = 0  # events JSON-parsed so far: the cost this scanner exists to avoid
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

    def feed(self, chunk: bytes) -> None:
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
        elif data.endswith(_BOUNDARIES):  # the usual chunk: whole events
            consumed = len(data)
        else:
            consumed = max(_last_end(data, b, resume) for b in _BOUNDARIES)
        if data is self._carry:
            del self._carry[:consumed]
        elif consumed < len(data):
            self._carry += memoryview(chunk)[consumed:]
        if len(self._carry) > MAX_EVENT_BYTES:
            del self._carry[:-_OVERLAP]

    def flush(self) -> None:
        """End of stream: an unterminated last event still counts."""
        if self._carry:
            self._event(self._carry, 0, len(self._carry))
            self._carry.clear()
        self._carry_marked = False

    def _marked(self, data: bytes | bytearray, start: int) -> bool:
        return (
            data.find(_USAGE_MARKERS[0], start) != -1
            or data.find(_USAGE_MARKERS[1], start) != -1
            or (not self.done and data.find(_DONE, start) != -1)
        )

    def _walk(self, data: bytes | bytearray, resume: int) -> int:
        """Handles each complete event in `data`; returns where the unfinished rest starts."""
        start, end = 0, len(data)
        # The next occurrence of each boundary kind; -1 once `data` has none left.
        ahead = [data.find(b, max(resume - _OVERLAP, 0)) for b in _BOUNDARIES]
        while any(at != -1 for at in ahead):
            at, kind = min((at, i) for i, at in enumerate(ahead) if at != -1)
            self._event(data, start, at)
            start = at + len(_BOUNDARIES[kind])
            ahead = [
                data.find(b, start, end) if 0 <= a < start else a
                for a, b in zip(ahead, _BOUNDARIES, strict=True)
            ]
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
        if not self.done and data.find(_DONE, start, end) != -1:
            self.done = _data_lines(bytes(data[start:end])) == [_DONE]


def _last_end(data: bytes | bytearray, boundary: bytes, start: int) -> int:
    at = data.rfind(boundary, start)
    return 0 if at == -1 else at + len(boundary)


def _data_lines(event: bytes) -> list[bytes]:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [line[6:] if line[5:6] == b" " else line[5:] for line in lines if line[:5] == b"data:"]


def _parse_usage_event(event: bytes) -> Usage | None:
    try:
        payload = orjson.loads(b"\n".join(_data_lines(event)))
    except orjson.JSONDecodeError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage_from_json(usage) if isinstance(usage, dict) else None
