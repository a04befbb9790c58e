"""The metering tee in each mode, over the mock's own stream bytes split at every point."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.metering.tee import Collect, CollectAddingUsage, Drop, Tee, Watch
from proxy.mock.content import expected_content, stream_events
from proxy.record import Usage
from proxy.sse import parse, usage_chunk

SEED, TOKENS, MODEL = 11, 6, "mock-gpt-4o"
DONE = b"data: [DONE]\n\n"
REPORTED = Usage(input=9, output=TOKENS)
TEXT = expected_content(SEED, TOKENS)


def _stream(include_usage: bool) -> tuple[bytes, bytes]:
    """A whole stream and its usage event (b"" without one)."""
    ev = stream_events(SEED, MODEL, TOKENS, "stop", include_usage)
    usage = ev.usage_event(9, TOKENS) if include_usage else b""
    return b"".join([ev.role, b": keep-alive\n\n", *ev.content, ev.final, usage, ev.done]), usage


WITH_USAGE, USAGE_EVENT = _stream(include_usage=True)
NO_USAGE, _ = _stream(include_usage=False)


def _first_content() -> dict[str, Any]:
    """The first content event's payload: the template an answer carries."""
    kind, payload = parse(stream_events(SEED, MODEL, TOKENS, "stop", False).content[0].rstrip())
    assert kind == "content"
    assert payload is not None
    return payload


FIRST = _first_content()


def _two_way(stream: bytes) -> list[list[bytes]]:
    return [[stream[:at], stream[at:]] for at in range(len(stream) + 1)]


def _run(tee: Tee, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    return [tee.feed(chunk) for chunk in chunks], tee.end()


class Synth:
    """Records each call; answers with counts derived from the text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, text: str) -> dict[str, int]:
        self.texts.append(text)
        return {"prompt_tokens": 4, "completion_tokens": len(text), "total_tokens": 4 + len(text)}


# --- watch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "usage"), [(WITH_USAGE, REPORTED), (NO_USAGE, None)], ids=["usage", "no-usage"]
)
def test_watch_passes_every_chunk_unchanged_and_reads_the_usage(
    stream: bytes, usage: Usage | None
) -> None:
    for chunks in _two_way(stream):
        tee = Watch()
        assert _run(tee, chunks) == (chunks, b"")
        assert tee.usage() == usage
        assert tee.text == ""


def test_watch_counts_an_unterminated_last_usage_event_at_end() -> None:
    tee = Watch()
    assert tee.feed(NO_USAGE[: -len(DONE)]) == NO_USAGE[: -len(DONE)]
    assert tee.feed(USAGE_EVENT.rstrip()) == USAGE_EVENT.rstrip()
    assert tee.end() == b""
    assert tee.usage() == REPORTED


# --- drop -------------------------------------------------------------------------------


def test_drop_removes_only_the_usage_event_and_keeps_its_usage() -> None:
    expected = WITH_USAGE.replace(USAGE_EVENT, b"")
    for chunks in _two_way(WITH_USAGE):
        tee = Drop()
        out, tail = _run(tee, chunks)
        assert b"".join(out) + tail == expected
        assert tee.usage() == REPORTED


def test_drop_holds_an_unfinished_event_and_end_flushes_it() -> None:
    tee = Drop()
    cut = WITH_USAGE.index(USAGE_EVENT) + 20  # inside the usage event
    assert tee.feed(WITH_USAGE[:cut]) == WITH_USAGE[: cut - 20]
    assert tee.end() == WITH_USAGE[cut - 20 : cut]
    assert tee.end() == b""
    assert tee.usage() is None  # an unfinished usage event is not usage


def test_drop_of_a_stream_without_usage_changes_nothing() -> None:
    tee = Drop()
    assert b"".join(_run(tee, [NO_USAGE[:100], NO_USAGE[100:]])[0]) == NO_USAGE
    assert tee.usage() is None


# --- collect ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "usage"), [(NO_USAGE, None), (WITH_USAGE, REPORTED)], ids=["no-usage", "usage"]
)
def test_collect_passes_every_byte_unchanged_and_gathers_the_text(
    stream: bytes, usage: Usage | None
) -> None:
    for chunks in _two_way(stream):
        tee = Collect()
        # Nothing will be added to the stream, so nothing is held back: each chunk as it comes.
        assert _run(tee, chunks) == (chunks, b"")
        assert (tee.text, tee.usage()) == (TEXT, usage)


def _synthesized(chunks: list[bytes]) -> tuple[bytes, Synth]:
    synth = Synth()
    tee = CollectAddingUsage(FIRST, synth)
    out, tail = _run(tee, chunks)
    return b"".join(out) + tail, synth


SYNTH_EXPECTED = NO_USAGE[: -len(DONE)] + usage_chunk(FIRST, Synth()(TEXT)) + DONE
DONE_AT = len(NO_USAGE) - len(DONE)
LAST_EVENT_AT = NO_USAGE.rindex(b"data: ", 0, DONE_AT)


@pytest.mark.parametrize(
    "chunks",
    [
        [NO_USAGE],
        [NO_USAGE[:DONE_AT], DONE],
        [NO_USAGE[:LAST_EVENT_AT], NO_USAGE[LAST_EVENT_AT:]],
        [NO_USAGE[: LAST_EVENT_AT + 30], NO_USAGE[LAST_EVENT_AT + 30 :]],
        [NO_USAGE[:DONE_AT], DONE[:-1], DONE[-1:]],
        [*(bytes([b]) for b in NO_USAGE[:DONE_AT]), DONE],
    ],
    ids=[
        "one-chunk",
        "done-alone",
        "done-shares-a-chunk-with-content",
        "done-shares-a-chunk-with-half-an-event",
        "done-without-its-blank-line",
        "byte-by-byte-then-done",
    ],
)
def test_synthesize_adds_one_usage_chunk_right_before_done(chunks: list[bytes]) -> None:
    out, synth = _synthesized(chunks)
    assert out == SYNTH_EXPECTED
    assert synth.texts == [TEXT]


def test_synthesized_usage_chunk_carries_the_template_identity() -> None:
    added = SYNTH_EXPECTED[DONE_AT : -len(DONE)]
    assert orjson.loads(added.removeprefix(b"data: ")) == {
        "id": f"chatcmpl-mock-{SEED}",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": len(TEXT),
            "total_tokens": 4 + len(TEXT),
        },
    }


@pytest.mark.parametrize("cut", range(1, len(b"data: [DONE]")), ids=lambda n: f"cut-{n}")
def test_synthesize_adds_the_usage_chunk_when_done_is_split_across_chunks(cut: int) -> None:
    out, _ = _synthesized([NO_USAGE[: DONE_AT + cut], NO_USAGE[DONE_AT + cut :]])
    assert out == SYNTH_EXPECTED


def _content_event(text: str) -> bytes:
    chunk: dict[str, Any] = {
        **FIRST,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_synthesize_ignores_done_inside_the_answer_text() -> None:
    text = "The stream ends with data: [DONE] and a blank line."
    content = _content_event(text)
    out, synth = _synthesized([content + DONE])
    assert out == content + usage_chunk(FIRST, Synth()(text)) + DONE
    assert synth.texts == [text]
