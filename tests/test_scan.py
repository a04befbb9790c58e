"""The metering stream readers are pure: the mock's own stream bytes, split at every point
and every way, through the usage-event dropper and the content collector."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.metering.scan import ContentCollector, UsageEventDropper
from proxy.mock.content import expected_content
from proxy.sse import EventSplitter, event_data
from tests.test_sse import (
    EVENTS,
    FRAMINGS,
    KEEPALIVE,
    SEED,
    TOKENS,
    TOOL_CALL,
    USAGE,
    USAGE_EVENT,
    _chunk,
    _split,
    _splitter_events,
    _stream,
)


def _dropped(chunks: list[bytes]) -> tuple[bytes, dict[str, Any] | None]:
    dropper = UsageEventDropper()
    out = b"".join(dropper.feed(chunk) for chunk in chunks) + dropper.flush()
    return out, dropper.usage


# --- UsageEventDropper ------------------------------------------------------------------


def test_the_dropper_takes_either_spelling_of_usage_and_passes_null_usage_chunks() -> None:
    # OpenAI puts `"usage":null` in every chunk once usage is asked for; Python's json.dumps
    # writes `"usage": {`. The first passes as it is, the second spelling is found too.
    content = b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": null}\n\n'
    spaced = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
    compact = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    for usage_event in (spaced, compact):
        out, usage = _dropped([content, content, usage_event, b"data: [DONE]\n\n"])
        assert out == content * 2 + b"data: [DONE]\n\n"
        assert usage == {"prompt_tokens": 3, "completion_tokens": 1}


@FRAMINGS
def test_dropper_removes_exactly_the_usage_event_at_every_two_way_split(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    expected = stream.replace(usage_event, b"")
    for at in range(len(stream) + 1):
        assert _dropped(_split(stream, [at])) == (expected, USAGE), at


@FRAMINGS
def test_dropper_removes_exactly_the_usage_event_from_one_byte_chunks(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert _dropped(chunks) == (stream.replace(usage_event, b""), USAGE)


def test_dropper_passes_event_aligned_chunks_straight_through() -> None:
    dropper = UsageEventDropper()
    frames = [e + b"\n\n" for e in EVENTS]
    out = [dropper.feed(frame) for frame in frames]
    assert out == [b"" if frame == USAGE_EVENT else frame for frame in frames]


def test_dropper_holds_an_unfinished_event_and_flush_returns_it() -> None:
    dropper = UsageEventDropper()
    assert dropper.feed(EVENTS[0] + b'\n\ndata: {"ch') == EVENTS[0] + b"\n\n"
    assert dropper.flush() == b'data: {"ch'
    assert dropper.flush() == b""


RIDING = b"data: " + orjson.dumps({**_chunk({}, "stop"), "usage": USAGE}) + b"\n\n"
RIDING_STREAM = b"".join(e + b"\n\n" for e in EVENTS[:-3]) + RIDING + b"data: [DONE]\n\n"


def test_dropper_keeps_a_usage_object_that_rides_on_a_chunk_with_choices() -> None:
    assert _dropped([RIDING_STREAM])[0] == RIDING_STREAM


def test_dropper_records_a_usage_object_that_rides_on_a_chunk_with_choices() -> None:
    assert _dropped([RIDING_STREAM]) == (RIDING_STREAM, USAGE)


def test_dropper_keeps_a_stray_blank_line_whatever_the_chunking() -> None:
    stream = EVENTS[0] + b"\n\n" + USAGE_EVENT + b"\n" + b"data: [DONE]\n\n"
    expected = EVENTS[0] + b"\n\n" + b"\n" + b"data: [DONE]\n\n"
    assert _dropped([stream]) == (expected, USAGE)
    for at in range(len(stream) + 1):
        assert _dropped(_split(stream, [at])) == (expected, USAGE), at


# --- ContentCollector ---------------------------------------------------------------------


@FRAMINGS
def test_collector_gathers_the_answer_text_and_usage(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    collector, splitter = ContentCollector(), EventSplitter()
    for i in range(len(stream)):
        for event in splitter.feed(stream[i : i + 1]):
            collector.observe(event)
    assert collector.text == expected_content(SEED, TOKENS)
    assert collector.usage == USAGE


@FRAMINGS
def test_collector_fed_raw_chunks_finds_the_same_events(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    """Event-aligned chunks (the usual case, read without a split) and every other cut."""
    end = b"\r\n\r\n" if b"\r" in stream else b"\n\n"
    aligned = [event + end for event in events]
    assert b"".join(aligned) == stream
    cuts = [
        aligned,
        [stream[i : i + 1] for i in range(len(stream))],
        *([stream[:at], stream[at:]] for at in range(0, len(stream), 7)),
    ]
    for chunks in cuts:
        collector = ContentCollector()
        for chunk in chunks:
            collector.feed(chunk)
        assert (collector.text, collector.usage) == (expected_content(SEED, TOKENS), USAGE)


def test_collector_counts_reasoning_and_tool_calls_and_skips_what_is_not_text() -> None:
    chunks = [
        _chunk({"reasoning_content": "think "}),
        _chunk({"content": None, "reasoning_content": None}),
        _chunk({"tool_calls": [TOOL_CALL]}),
        _chunk({"content": "answer"}),
        {"choices": ["not a choice", {"delta": "not a delta"}]},
    ]
    collector = ContentCollector()
    for c in chunks:
        collector.observe(b"data: " + orjson.dumps(c))
    for event in EventSplitter().feed(KEEPALIVE + b"data: [DONE]\n\n"):
        collector.observe(event)
    tool = TOOL_CALL["function"]
    expected = ["think ", *(v for k in ("name", "arguments") if (v := tool.get(k))), "answer"]
    assert (collector.parts, collector.usage) == (expected, None)
    assert collector.done


def test_collector_skips_choices_that_are_no_list() -> None:
    collector = ContentCollector()
    for choices in (5, "text", {"0": {"delta": {"content": "x"}}}, None):
        collector.observe(b"data: " + orjson.dumps({"choices": choices, "usage": USAGE}))
    assert (collector.text, collector.usage) == ("", USAGE)


# --- properties -------------------------------------------------------------------------


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes], list[bytes]]:
    seed, tokens = draw(st.integers(0, 10_000)), draw(st.integers(0, 6))
    stream, usage_event, events = _stream(seed, tokens, crlf=draw(st.booleans()))
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=16))
    return stream, usage_event, events, _split(stream, cuts)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(split_streams())
def test_any_chunking_drops_only_the_usage_event_and_splits_the_same_events(
    case: tuple[bytes, bytes, list[bytes], list[bytes]],
) -> None:
    stream, usage_event, events, chunks = case
    out, usage = _dropped(chunks)
    assert out == stream.replace(usage_event, b"")
    assert usage == orjson.loads(event_data(usage_event.strip()) or b"")["usage"]
    assert _splitter_events(chunks) == events
