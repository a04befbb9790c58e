"""The SSE helpers are pure: the mock's own stream bytes, split at every point and every way."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from proxy.mock.content import completion_body, expected_content, stream_events
from proxy.sse import (
    EventSplitter,
    Kind,
    completion_to_sse,
    event_data,
    parse,
    usage_chunk,
)

SEED, TOKENS, MODEL = 7, 5, "mock-gpt-4o"
USAGE = {"prompt_tokens": 9, "completion_tokens": TOKENS, "total_tokens": 9 + TOKENS}
KEEPALIVE = b": keep-alive\n\n"


def _stream(seed: int, tokens: int, *, crlf: bool = False) -> tuple[bytes, bytes, list[bytes]]:
    """A whole include_usage stream, its usage event, and its events without blank lines."""
    ev = stream_events(seed, MODEL, tokens, "stop", True)
    usage = ev.usage_event(9, tokens)
    frames = [ev.role, KEEPALIVE, *ev.content, ev.final, usage, ev.done]
    if crlf:  # JSON holds no raw newlines, so only the framing changes
        frames, usage = [f.replace(b"\n", b"\r\n") for f in frames], usage.replace(b"\n", b"\r\n")
    end = b"\r\n\r\n" if crlf else b"\n\n"
    return b"".join(frames), usage, [f.removesuffix(end) for f in frames]


STREAM, USAGE_EVENT, EVENTS = _stream(SEED, TOKENS)
CRLF_STREAM, CRLF_USAGE_EVENT, CRLF_EVENTS = _stream(SEED, TOKENS, crlf=True)
FRAMINGS = pytest.mark.parametrize(
    ("stream", "usage_event", "events"),
    [(STREAM, USAGE_EVENT, EVENTS), (CRLF_STREAM, CRLF_USAGE_EVENT, CRLF_EVENTS)],
    ids=["lf", "crlf"],
)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def _splitter_events(chunks: list[bytes]) -> list[bytes]:
    splitter = EventSplitter()
    return [event for chunk in chunks for event in splitter.feed(chunk)]


# --- EventSplitter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "events"),
    [
        (b"data: a\n\ndata: b\n\n", [b"data: a", b"data: b"]),
        (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"data: a", b"data: b"]),
        (b"data: a\n\ndata: b\r\n\r\n", [b"data: a", b"data: b"]),
        (b"event: x\ndata: a\n\n", [b"event: x\ndata: a"]),
        (b"data: a\n\ndata: b", [b"data: a"]),
        (b"data: a\n", []),
        (b"\n\n", [b""]),
    ],
    ids=["lf", "crlf", "mixed", "multi-line", "unfinished-tail", "no-blank-line", "empty"],
)
def test_splitter_cuts_events_at_blank_lines(chunk: bytes, events: list[bytes]) -> None:
    assert EventSplitter().feed(chunk) == events


def test_splitter_holds_an_unfinished_event_until_its_blank_line() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n") == []
    assert splitter.feed(b"\r") == []
    assert splitter.feed(b"\ndata: b\n") == [b"data: a"]
    assert splitter.feed(b"\n") == [b"data: b"]


@FRAMINGS
def test_splitter_events_are_the_same_at_every_two_way_split(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    assert _splitter_events([stream]) == events
    for at in range(len(stream) + 1):
        assert _splitter_events(_split(stream, [at])) == events, at


@FRAMINGS
def test_splitter_events_are_the_same_from_one_byte_chunks(
    stream: bytes, usage_event: bytes, events: list[bytes]
) -> None:
    assert _splitter_events([stream[i : i + 1] for i in range(len(stream))]) == events


# --- event_data and parse ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "data"),
    [
        (b"data: x", b"x"),
        (b"data:x", b"x"),
        (b"data:  x", b" x"),
        (b"data: a\ndata: b", b"a\nb"),
        (b"data: a\r\ndata: b", b"a\nb"),
        (b"data: a\rdata: b", b"a\nb"),
        (b"event: delta\nid: 3\ndata: x", b"x"),
        (b"data:", b""),
        (b": keep-alive", None),
        (b"event: ping", None),
        (b"", None),
    ],
    ids=[
        "one-space-stripped",
        "no-space",
        "only-one-space-stripped",
        "lines-joined",
        "crlf-lines-joined",
        "lone-cr-ends-a-line",
        "other-fields-ignored",
        "empty-data",
        "comment",
        "no-data-field",
        "empty-event",
    ],
)
def test_event_data(event: bytes, data: bytes | None) -> None:
    assert event_data(event) == data


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}


TOOL_CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
PAYLOADS: dict[str, tuple[dict[str, Any], Kind]] = {
    "content": (_chunk({"content": "Hi"}), "content"),
    "role-only": (_chunk({"role": "assistant", "content": ""}), "other"),
    "empty-delta": (_chunk({}), "other"),
    "null-usage-on-a-role-chunk": ({**_chunk({"role": "assistant"}), "usage": None}, "other"),
    "finish-reason-only": (_chunk({}, "stop"), "content"),
    "tool-calls": (_chunk({"tool_calls": [TOOL_CALL]}), "content"),
    "function-call": (_chunk({"function_call": {"name": "f", "arguments": ""}}), "content"),
    "reasoning-content": (_chunk({"reasoning_content": "Let me think"}), "content"),
    "refusal": (_chunk({"refusal": "No."}), "content"),
    "usage-event": ({"id": "c1", "choices": [], "usage": USAGE}, "content"),
    "running-usage-on-a-role-chunk": ({**_chunk({"role": "assistant"}), "usage": USAGE}, "other"),
    "running-usage-on-a-content-chunk": ({**_chunk({"content": "Hi"}), "usage": USAGE}, "content"),
    "azure-prompt-filter": ({"choices": [], "id": "", "prompt_filter_results": []}, "other"),
    "error-event": ({"error": {"message": "overloaded", "type": "server_error"}}, "error"),
    "no-choices": ({"id": "c1", "choices": []}, "other"),
    "choices-not-a-list": ({"id": "c1", "choices": 5}, "other"),
    "completions-text": (
        {"object": "text_completion", "choices": [{"index": 0, "text": " the"}]},
        "content",
    ),
    "completions-empty-text": (
        {"object": "text_completion", "choices": [{"index": 0, "text": ""}]},
        "other",
    ),
}


@pytest.mark.parametrize(("payload", "kind"), list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_parse_json_events(payload: dict[str, Any], kind: Kind) -> None:
    assert parse(b"data: " + orjson.dumps(payload)) == (kind, payload)


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (b"data: [DONE]", "done"),
        (b"data:[DONE] ", "done"),
        (b": keep-alive", "other"),
        (b"data: {not json", "other"),
        (b'data: "a string"', "other"),
        (b"data: [1, 2]", "other"),
        (b"", "other"),
    ],
    ids=[
        "done",
        "done-unspaced",
        "keep-alive",
        "invalid-json",
        "json-string",
        "json-array",
        "empty",
    ],
)
def test_parse_events_without_a_payload(event: bytes, kind: Kind) -> None:
    assert parse(event) == (kind, None)


# --- usage_chunk, completion_to_sse -----------------------------------


@pytest.mark.parametrize(
    ("template", "head"),
    [
        (
            {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"},
            b'{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m",',
        ),
        (
            {"model": "m", "choices": [{"index": 0}], "system_fingerprint": "fp", "id": "c1"},
            b'{"id":"c1","model":"m",',
        ),
        ({}, b"{"),
    ],
    ids=["full-template", "only-identity-fields-in-fixed-order", "empty-template"],
)
def test_usage_chunk_is_an_openai_usage_only_event(template: dict[str, Any], head: bytes) -> None:
    usage = b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}'
    assert usage_chunk(template, USAGE) == b"data: " + head + usage + b"\n\n"


def _payloads(sse: bytes) -> list[dict[str, Any] | str]:
    events = EventSplitter().feed(sse)
    return [payload or kind for kind, payload in map(parse, events)]


@pytest.mark.parametrize("with_usage", [True, False], ids=["with-usage", "without-usage"])
def test_completion_becomes_chunks_then_usage_then_done(with_usage: bool) -> None:
    sse = completion_to_sse(completion_body(SEED, MODEL, TOKENS, "stop", 9), with_usage=with_usage)
    assert sse is not None
    assert sse.endswith(b"\n\ndata: [DONE]\n\n")
    head = {
        "id": f"chatcmpl-mock-{SEED}",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
    }
    message = {"role": "assistant", "content": expected_content(SEED, TOKENS)}
    choice = {"index": 0, "delta": message, "finish_reason": "stop"}
    usage = [{**head, "choices": [], "usage": USAGE}] if with_usage else []
    assert _payloads(sse) == [{**head, "choices": [choice]}, *usage, "done"]


def test_completion_gives_one_chunk_per_choice_and_no_usage_it_lacks() -> None:
    choices: list[dict[str, Any]] = [
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
        {"index": 2, "finish_reason": None},
    ]
    sse = completion_to_sse(orjson.dumps({"id": "x", "choices": choices}), with_usage=True)
    assert sse is not None
    head = {"id": "x", "object": "chat.completion.chunk"}
    assert _payloads(sse) == [
        {
            **head,
            "choices": [{"index": 0, "delta": choices[0]["message"], "finish_reason": "stop"}],
        },
        {
            **head,
            "choices": [{"index": 1, "delta": choices[1]["message"], "finish_reason": "length"}],
        },
        {**head, "choices": [{"index": 2, "delta": {}, "finish_reason": None}]},
        "done",
    ]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"error": {"message": "no"}}', b'{"choices": {"0": {}}}', b""],
    ids=["invalid-json", "array", "error-body", "choices-not-a-list", "empty"],
)
def test_a_body_that_is_not_a_completion_is_not_converted(body: bytes) -> None:
    assert completion_to_sse(body, with_usage=True) is None
