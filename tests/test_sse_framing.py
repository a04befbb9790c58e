"""SSE framing edge cases, as one table, through every reader of event boundaries.

An SSE line ends with CRLF, LF or a lone CR; an event ends with a blank line. Each case below
writes the same answer (a comment, multi-line data, other fields, reasoning, content, a tool
call, the usage event, `[DONE]`) with other line endings, and every reader — the splitter, the
usage-event dropper, the usage finder, the content collector and each tee — must find the same
events, usage and text, however the bytes are cut.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from proxy.metering.reported import usage_from_json
from proxy.metering.scan import ContentCollector, UsageEventDropper, UsageEventFinder
from proxy.metering.tee import Collect, CollectAddingUsage, Drop, Tee, Watch
from proxy.sse import (
    BLANK_LINES,
    EventSplitter,
    event_data,
    last_blank_line_end,
    split_complete,
    usage_chunk,
)

CR, LF, CRLF = b"\r", b"\n", b"\r\n"
NAMES = {CR: "cr", LF: "lf", CRLF: "crlf"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
CALL = {"index": 0, "id": "call_1", "type": "function"}


def _delta(**delta: Any) -> bytes:
    return orjson.dumps({**HEAD, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


# The answer, event by event, as its lines (before any line ending is chosen).
REASONING = _delta(reasoning_content="Let me think. ")
CUT = REASONING.index(b',"choices"')
EVENTS: list[list[bytes]] = [
    [b": keep-alive"],
    [b"data: " + _delta(role="assistant", content="")],
    # One JSON payload over two data lines: the joiner puts a newline between them.
    [b"data: " + REASONING[:CUT], b"data: " + REASONING[CUT:]],
    [b"event: message", b"id: 3", b"data: " + _delta(content="Hello")],
    [b": a comment between content events"],
    [b"data:" + _delta(content=", world")],  # no space after the colon
    [b"data: " + _delta(tool_calls=[{**CALL, "function": {"name": "lookup", "arguments": ""}}])],
    [b"data: " + _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"q":1}'}}])],
    [
        b"data: "
        + orjson.dumps(
            {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        )
    ],
    [b"data: " + orjson.dumps({**HEAD, "choices": [], "usage": USAGE})],
    [b"data: [DONE]"],
]
USAGE_AT = 9
TEXT = "Let me think. Hello, world" + "lookup" + '{"q":1}'
DATA_LINES = sum(line.startswith(b"data:") for lines in EVENTS for line in lines)
DATA = [event_data(b"\n".join(lines)) for lines in EVENTS]

# Every blank line SSE allows: the line ending of the event's last line, then that of the
# empty line. CR then LF would be one CRLF, so that pair is no blank line.
PAIRS = [(a, b) for a in (LF, CRLF, CR) for b in (LF, CRLF, CR) if a + b != CRLF]


def _frame(lines: list[bytes], ending: bytes, blank: bytes) -> bytes:
    return ending.join(lines) + ending + blank


def _frames(pairs: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The answer's events, the i-th written with the i-th pair (cycling) of line endings."""
    return [_frame(lines, *pair) for lines, pair in zip(EVENTS, itertools.cycle(pairs))]


CASES: dict[str, list[bytes]] = {
    **{f"{NAMES[a]}-{NAMES[b]}": _frames([(a, b)]) for a, b in PAIRS},
    "alternating": _frames(PAIRS),
    "alternating-reversed": _frames(PAIRS[::-1]),
}
FRAMINGS = pytest.mark.parametrize("frames", list(CASES.values()), ids=list(CASES))


def _chunkings(stream: bytes) -> Iterator[list[bytes]]:
    """Whole, cut in two at every byte, and one byte at a time."""
    yield [stream]
    for at in range(1, len(stream)):
        yield [stream[:at], stream[at:]]
    yield [stream[i : i + 1] for i in range(len(stream))]


def test_the_blank_line_set_is_every_pair_of_line_endings() -> None:
    assert sorted(BLANK_LINES) == sorted(a + b for a, b in PAIRS)


def test_the_alternating_cases_use_every_blank_line() -> None:
    assert len(EVENTS) >= len(PAIRS)


@pytest.mark.parametrize(
    ("data", "final", "events", "rest"),
    [
        (b"a\n\nb", False, [(b"a", b"\n\n")], b"b"),
        (b"a\r\n\r\nb", False, [(b"a", b"\r\n\r\n")], b"b"),
        (b"a\r\rb", False, [(b"a", b"\r\r")], b"b"),
        (b"a\r\n\nb", False, [(b"a", b"\r\n\n")], b"b"),
        (b"a\n\r\nb", False, [(b"a", b"\n\r\n")], b"b"),
        (b"a\r\r\nb", False, [(b"a", b"\r\r\n")], b"b"),
        (b"a\n\rb", False, [(b"a", b"\n\r")], b"b"),
        (b"a\r\n\rb", False, [(b"a", b"\r\n\r")], b"b"),
        (b"a\r\nb\r\n", False, [], b"a\r\nb\r\n"),
        (b"a\rb\n\n", False, [(b"a\rb", b"\n\n")], b""),
        (b"a\n\n\nb\n\n", False, [(b"a", b"\n\n"), (b"\nb", b"\n\n")], b""),
        (b"a\r\r", False, [], b"a\r\r"),
        (b"a\r\r", True, [(b"a", b"\r\r")], b""),
        (b"a\r\n\r", False, [], b"a\r\n\r"),
        (b"a\r\n\r", True, [(b"a", b"\r\n\r")], b""),
        (b"a\n\r", True, [(b"a", b"\n\r")], b""),
    ],
    ids=[
        "lf",
        "crlf",
        "cr",
        "crlf-then-lf",
        "lf-then-crlf",
        "cr-then-crlf",
        "lf-then-cr",
        "crlf-then-cr",
        "one-crlf-is-one-line-ending",
        "a-lone-cr-ends-a-line",
        "a-stray-blank-line-starts-the-next-event",
        "a-closing-cr-waits-for-the-next-byte",
        "a-closing-cr-ends-the-stream",
        "a-closing-crlf-cr-waits",
        "a-closing-crlf-cr-ends-the-stream",
        "a-closing-lf-cr-ends-the-stream",
    ],
)
def test_split_complete(
    data: bytes, final: bool, events: list[tuple[bytes, bytes]], rest: bytes
) -> None:
    got, end = split_complete(data, final=final)
    assert (got, data[end:]) == (events, rest)


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"a\n\nb", 3),
        (b"a\r\n\r\nb", 5),
        (b"a\r\rb", 3),
        (b"a\r\r\nb", 4),
        (b"a\n\rb", 3),
        (b"a\r\n\nb\n\nc", 7),
        (b"a\r\nb", 0),
        (b"a\n\nb\ndata: c", 3),
        (b"a\r\n\r", 4),
    ],
    ids=[
        "lf",
        "crlf",
        "cr",
        "cr-then-crlf",
        "lf-then-cr",
        "the-last-of-two",
        "no-blank-line",
        "an-unfinished-event-of-two-lines",
        "a-closing-cr-is-taken",
    ],
)
def test_last_blank_line_end(data: bytes, end: int) -> None:
    assert last_blank_line_end(data) == end


# --- every reader, every case, every cut --------------------------------------------------


def _each_cut(frames: list[bytes], check: Callable[[list[bytes]], None]) -> None:
    for chunks in _chunkings(b"".join(frames)):
        check(chunks)


@FRAMINGS
def test_splitter_finds_every_event(frames: list[bytes]) -> None:
    def check(chunks: list[bytes]) -> None:
        splitter = EventSplitter()
        events = [e for chunk in chunks for e in splitter.feed(chunk)] + splitter.flush()
        assert [event_data(e) for e in events] == DATA, chunks

    _each_cut(frames, check)


@FRAMINGS
def test_dropper_takes_out_exactly_the_usage_event(frames: list[bytes]) -> None:
    expected = b"".join(frames[:USAGE_AT] + frames[USAGE_AT + 1 :])

    def check(chunks: list[bytes]) -> None:
        dropper = UsageEventDropper()
        out = b"".join(map(dropper.feed, chunks)) + dropper.flush()
        assert (out, dropper.usage) == (expected, USAGE), chunks

    _each_cut(frames, check)


@FRAMINGS
def test_finder_finds_the_usage(frames: list[bytes]) -> None:
    def check(chunks: list[bytes]) -> None:
        finder = UsageEventFinder()
        assert [finder.feed(chunk) for chunk in chunks] == chunks
        finder.flush()
        assert finder.usage == usage_from_json(USAGE), chunks

    _each_cut(frames, check)


@FRAMINGS
def test_collector_gathers_the_text_usage_and_end(frames: list[bytes]) -> None:
    def check(chunks: list[bytes]) -> None:
        collector = ContentCollector()
        assert [collector.feed(chunk) for chunk in chunks] == chunks
        collector.flush()
        assert (collector.text, collector.usage, collector.done) == (TEXT, USAGE, True), chunks

    _each_cut(frames, check)


TEES: list[Callable[[], Tee]] = [Watch, Drop, Collect]


@FRAMINGS
@pytest.mark.parametrize("make", TEES, ids=["Watch", "Drop", "Collect"])
def test_every_tee_relays_the_same_and_reads_the_same_usage(
    frames: list[bytes], make: Callable[[], Tee]
) -> None:
    stream = b"".join(frames)
    relayed = stream if make is not Drop else stream.replace(frames[USAGE_AT], b"")

    def check(chunks: list[bytes]) -> None:
        tee = make()
        out = b"".join(map(tee.feed, chunks)) + tee.end()
        assert (out, tee.usage()) == (relayed, usage_from_json(USAGE)), chunks
        assert tee.text == (TEXT if tee.keeps_text else "")

    _each_cut(frames, check)


def _adding_usage() -> Tee:
    return CollectAddingUsage({}, lambda text: {"completion_tokens": len(text)})


@FRAMINGS
@pytest.mark.parametrize(
    "make", [*TEES, _adding_usage], ids=["Watch", "Drop", "Collect", "CollectAddingUsage"]
)
def test_every_tee_counts_the_data_lines(frames: list[bytes], make: Callable[[], Tee]) -> None:
    """(A `data:` cut in two by a chunk boundary is not counted: the count is an estimate.)"""
    for chunks in ([b"".join(frames)], frames):
        tee = make()
        for chunk in chunks:
            tee.feed(chunk)
        assert tee.events == DATA_LINES


@FRAMINGS
def test_the_added_usage_chunk_lands_right_before_done(frames: list[bytes]) -> None:
    without_usage = frames[:USAGE_AT] + frames[USAGE_AT + 1 :]
    template = orjson.loads(_delta(content=""))
    added = usage_chunk(template, {"completion_tokens": len(TEXT)})
    expected = b"".join(without_usage[:-1]) + added + without_usage[-1]

    def check(chunks: list[bytes]) -> None:
        tee = CollectAddingUsage(template, lambda text: {"completion_tokens": len(text)})
        out = b"".join(map(tee.feed, chunks)) + tee.end()
        assert (out, tee.text) == (expected, TEXT), chunks

    _each_cut(without_usage, check)
