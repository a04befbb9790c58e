"""Where a request's usage comes from: the tee per case, then stream, headers, estimate."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import orjson
import pytest

from proxy.answer import Answer
from proxy.api_request import ApiRequest, StreamOptionsAction
from proxy.config import Target, Upstream, UsageHeaders
from proxy.headers import Headers
from proxy.metering.estimate import estimate_usage, response_texts
from proxy.metering.tee import Collect, CollectAddingUsage, Drop, Tee, Watch
from proxy.metering.usage import tee_for, usage_of_body, usage_of_stream
from proxy.mock.content import expected_content, stream_events
from proxy.record import Usage
from proxy.sse import completion_to_sse, parse, usage_chunk

SEED, TOKENS, MODEL = 3, 4, "mock-gpt-4o"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "有货吗?"}]
DONE = b"data: [DONE]\n\n"
TEXT = expected_content(SEED, TOKENS)

PLAIN = Upstream("up", "http://up.test/v1")
COUNTED = Upstream(
    "up", "http://up.test/v1", usage_headers=UsageHeaders("x-prompt-tokens", "x-completion-tokens")
)
SENT: Headers = [
    (b"Content-Type", b"text/event-stream"),
    (b"X-Prompt-Tokens", b"12"),
    (b"x-completion-tokens", b"34"),
]
FROM_HEADERS = Usage(input=12, output=34, source="header")
# Header states: none configured / configured and sent / configured but absent from this answer.
HEADER_CASES: dict[str, tuple[Upstream, Headers]] = {
    "no-headers": (PLAIN, SENT),
    "headers-sent": (COUNTED, SENT),
    "headers-absent": (COUNTED, [(b"content-type", b"text/event-stream")]),
}


def _stream(include_usage: bool) -> bytes:
    ev = stream_events(SEED, MODEL, TOKENS, "stop", include_usage)
    usage = [ev.usage_event(9, TOKENS)] if include_usage else []
    return b"".join([ev.role, *ev.content, ev.final, *usage, ev.done])


WITH_USAGE, NO_USAGE = _stream(include_usage=True), _stream(include_usage=False)
FIRST = parse(stream_events(SEED, MODEL, TOKENS, "stop", False).content[0].rstrip())[1]


def _request(wants_usage: bool, *, stream: bool = True) -> ApiRequest:
    payload: dict[str, Any] = {"model": "bot", "messages": MESSAGES, "stream": stream}
    if wants_usage:
        payload["stream_options"] = {"include_usage": True}
    return ApiRequest(model="bot", stream=stream, payload=payload)


# Never read here: only its presence (the answer goes on) matters to the tee's choice.
_STREAM: Any = object()


def _answer(
    *,
    complete: bool = False,
    action: StreamOptionsAction = "pass",
    headers: Headers | None = None,
    head: bytes = b"",
    status: int = 200,
) -> Answer:
    return Answer(
        target=Target("up", MODEL),
        status=status,
        headers=SENT if headers is None else headers,
        head=head,
        response=None if complete else _STREAM,
        first_event=FIRST,
        stream_options=action,
        body_usage=_reported(head) if complete else None,
    )


def _reported(head: bytes) -> dict[str, Any] | None:
    """What attempts puts on a whole answer: its body's usage object, parsed once there."""
    try:
        usage = orjson.loads(head).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _feed(tee: Tee, stream: bytes) -> bytes:
    return tee.feed(stream) + tee.end()


# --- which tee ----------------------------------------------------------------------------

# (client wants usage, action, header state) → (tee, adds a usage chunk) for an answer that
# still streams. Header usage only matters to a client that did not ask for the usage chunk.
STREAMING: list[tuple[bool, StreamOptionsAction, str, type[Tee], bool]] = [
    *((True, "inject", h, Watch, False) for h in HEADER_CASES),
    *((True, "pass", h, Watch, False) for h in HEADER_CASES),
    *((True, "strip", h, CollectAddingUsage, True) for h in HEADER_CASES),
    *((False, "inject", h, Drop, False) for h in HEADER_CASES),
    (False, "pass", "no-headers", Collect, False),
    (False, "pass", "headers-sent", Watch, False),
    (False, "pass", "headers-absent", Collect, False),
    (False, "strip", "no-headers", Collect, False),
    (False, "strip", "headers-sent", Watch, False),
    (False, "strip", "headers-absent", Collect, False),
]
# A complete answer (a converted JSON body, or a stream that ended before any content) is
# small and already whole: collect it, so an answer without usage is estimated from its text.
# (The conversion adds a usage chunk only when the client asked for one.)
COMPLETE = [
    (wants, action, h, Collect, False)
    for wants, action, h in itertools.product(
        (True, False), ("inject", "pass", "strip"), HEADER_CASES
    )
]
TEE_CASES = [(w, a, h, False, (m, s)) for w, a, h, m, s in STREAMING] + [
    (w, a, h, True, (m, s)) for w, a, h, m, s in COMPLETE
]


def _tee_id(case: tuple[bool, str, str, bool, tuple[type[Tee], bool]]) -> str:
    wants, action, headers, complete, _ = case
    return "-".join(
        ["wants" if wants else "unasked", action, headers, "complete" if complete else "streaming"]
    )


@pytest.mark.parametrize(
    ("wants", "action", "header_case", "complete", "expected"),
    TEE_CASES,
    ids=[_tee_id(case) for case in TEE_CASES],
)
def test_tee_for(
    wants: bool,
    action: StreamOptionsAction,
    header_case: str,
    complete: bool,
    expected: tuple[type[Tee], bool],
) -> None:
    upstream, headers = HEADER_CASES[header_case]
    answer = _answer(complete=complete, action=action, headers=headers)
    tee = tee_for(_request(wants), answer, upstream)
    assert (type(tee), tee.feed(DONE) != DONE) == expected  # (tee, adds a usage chunk)


@pytest.mark.parametrize(
    ("header_case", "usage"),
    [("headers-sent", FROM_HEADERS), ("headers-absent", estimate_usage(MESSAGES, TEXT))],
    ids=["from-headers", "estimated"],
)
def test_the_added_usage_chunk_matches_the_recorded_usage(header_case: str, usage: Usage) -> None:
    upstream, headers = HEADER_CASES[header_case]
    request, answer = _request(True), _answer(action="strip", headers=headers)
    tee = tee_for(request, answer, upstream)
    counts = {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion}
    counts["total_tokens"] = usage.prompt + usage.completion
    assert FIRST is not None
    expected = NO_USAGE[: -len(DONE)] + usage_chunk(FIRST, counts) + DONE
    assert _feed(tee, NO_USAGE) == expected
    assert usage_of_stream(request, answer, upstream, tee) == usage


# --- usage of a stream --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wants", "action", "header_case", "stream", "usage"),
    [
        (True, "pass", "headers-sent", WITH_USAGE, Usage(input=9, output=TOKENS)),
        (False, "inject", "headers-sent", WITH_USAGE, Usage(input=9, output=TOKENS)),
        (False, "pass", "headers-sent", NO_USAGE, FROM_HEADERS),
        (False, "pass", "headers-absent", NO_USAGE, estimate_usage(MESSAGES, TEXT)),
        (False, "strip", "no-headers", NO_USAGE, estimate_usage(MESSAGES, TEXT)),
    ],
    ids=[
        "reported-wins-over-headers",
        "reported-in-the-dropped-event",
        "headers-when-the-stream-reports-none",
        "estimate-when-headers-are-absent",
        "estimate-from-the-collected-text",
    ],
)
def test_usage_of_stream(
    wants: bool,
    action: StreamOptionsAction,
    header_case: str,
    stream: bytes,
    usage: Usage,
) -> None:
    upstream, headers = HEADER_CASES[header_case]
    request, answer = _request(wants), _answer(action=action, headers=headers)
    tee = tee_for(request, answer, upstream)
    _feed(tee, stream)
    assert usage_of_stream(request, answer, upstream, tee) == usage


def _completion(content: str, usage: dict[str, int] | None = None) -> bytes:
    message = {"role": "assistant", "content": content}
    body: dict[str, Any] = {"id": "x", "choices": [{"index": 0, "message": message}]}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def test_a_converted_json_answer_with_usage_reports_it() -> None:
    head = completion_to_sse(
        _completion(TEXT, {"prompt_tokens": 5, "completion_tokens": 2}), with_usage=True
    )
    assert head is not None
    request, answer = _request(False), _answer(complete=True, head=head, headers=[])
    tee = tee_for(request, answer, PLAIN)
    _feed(tee, head)
    assert usage_of_stream(request, answer, PLAIN, tee) == Usage(input=5, output=2)


@pytest.mark.parametrize("wants", [True, False], ids=["wants", "unasked"])
def test_a_converted_json_answer_without_usage_is_estimated_from_its_text(wants: bool) -> None:
    head = completion_to_sse(_completion(TEXT), with_usage=True)
    assert head is not None
    request, answer = _request(wants), _answer(complete=True, head=head, headers=[])
    tee = tee_for(request, answer, PLAIN)
    _feed(tee, head)
    assert usage_of_stream(request, answer, PLAIN, tee) == estimate_usage(MESSAGES, TEXT)


# --- usage of a whole body ------------------------------------------------------------------

BODY_USAGE = {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}


@pytest.mark.parametrize(
    ("status", "body", "header_case", "usage"),
    [
        (200, _completion(TEXT, BODY_USAGE), "no-headers", Usage(input=20, output=7)),
        (200, _completion(TEXT, BODY_USAGE), "headers-sent", Usage(input=20, output=7)),
        (200, _completion(TEXT), "headers-sent", FROM_HEADERS),
        (200, _completion(TEXT), "headers-absent", estimate_usage(MESSAGES, TEXT)),
        (200, _completion(TEXT), "no-headers", estimate_usage(MESSAGES, TEXT)),
        (200, b"{not json", "no-headers", estimate_usage(MESSAGES, "")),
        (200, b'{"usage": null}', "no-headers", estimate_usage(MESSAGES, "")),
        (200, b'{"choices": 5}', "no-headers", estimate_usage(MESSAGES, "")),
        (299, _completion(TEXT, BODY_USAGE), "no-headers", Usage(input=20, output=7)),
        (400, _completion(TEXT, BODY_USAGE), "headers-sent", None),
        (429, _completion(TEXT, BODY_USAGE), "no-headers", None),
        (500, _completion(TEXT, BODY_USAGE), "no-headers", None),
        (304, _completion(TEXT, BODY_USAGE), "no-headers", None),
    ],
    ids=[
        "from-the-body",
        "body-wins-over-headers",
        "headers-when-the-body-has-none",
        "estimate-when-headers-are-absent",
        "estimate-from-the-message-text",
        "invalid-json-estimates-the-prompt",
        "null-usage-estimates",
        "choices-not-a-list-estimates-the-prompt",
        "any-2xx",
        "error-400-is-not-metered",
        "error-429-is-not-metered",
        "error-500-is-not-metered",
        "non-2xx-is-not-metered",
    ],
)
def test_usage_of_body(status: int, body: bytes, header_case: str, usage: Usage | None) -> None:
    upstream, headers = HEADER_CASES[header_case]
    answer = _answer(complete=True, status=status, headers=headers, head=body)
    assert usage_of_body(_request(False, stream=False), answer, upstream) == usage


def test_usage_of_body_estimates_over_every_choice() -> None:
    choices = [
        {"index": 0, "message": {"role": "assistant", "content": "first "}},
        {"index": 1, "message": {"role": "assistant", "content": "second"}},
        {"index": 2, "message": {"role": "assistant", "content": None}},
        "not a choice",
    ]
    answer = _answer(complete=True, headers=[], head=orjson.dumps({"choices": choices}))
    usage = usage_of_body(_request(False, stream=False), answer, PLAIN)
    assert usage == estimate_usage(MESSAGES, "first second")


# --- the same answer, streamed or whole, is estimated the same --------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "track", "arguments": '{"o": 7}'}}
MESSAGE = {
    "role": "assistant",
    "reasoning_content": "Think. ",
    "content": "Ships.",
    "tool_calls": [CALL],
}
ANSWER_TEXT = 'Think. Ships.track{"o": 7}'
# How an upstream streams it: role first, then the text in pieces, the tool call's name with
# the first piece of its arguments.
DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": ""},
    {"reasoning_content": "Think"},
    {"reasoning_content": ". "},
    {"content": "Ships"},
    {"content": "."},
    {"tool_calls": [{**CALL, "index": 0, "function": {"name": "track", "arguments": '{"o"'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": ": 7}"}}]},
]


def _sse(payloads: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads) + DONE


def _deltas(index: int) -> list[dict[str, Any]]:
    return [{"choices": [{"index": index, "delta": d, "finish_reason": None}]} for d in DELTAS]


ONE = _sse(_deltas(0))
# Two choices, their chunks interleaved as upstreams send them.
TWO = _sse([c for pair in zip(_deltas(0), _deltas(1), strict=True) for c in pair])


@pytest.mark.parametrize(("choices", "stream"), [(1, ONE), (2, TWO)], ids=["one", "two-choices"])
def test_a_streamed_answer_and_the_same_answer_whole_are_estimated_alike(
    choices: int, stream: bytes
) -> None:
    whole = [
        {"index": i, "message": MESSAGE, "finish_reason": "tool_calls"} for i in range(choices)
    ]
    body = orjson.dumps({"id": "x", "choices": whole})
    expected = estimate_usage(MESSAGES, ANSWER_TEXT * choices)
    answer = _answer(complete=True, headers=[], head=body)
    assert usage_of_body(_request(False, stream=False), answer, PLAIN) == expected
    converted = completion_to_sse(body, with_usage=False)
    assert converted is not None
    for streamed, complete in ((stream, False), (converted, True)):
        request = _request(False)
        answer = _answer(complete=complete, action="pass", headers=[], head=streamed)
        tee = tee_for(request, answer, PLAIN)
        _feed(tee, streamed)
        assert usage_of_stream(request, answer, PLAIN, tee) == expected


@pytest.mark.parametrize(
    ("wants", "action"), [(True, "pass"), (False, "inject")], ids=["watch", "drop"]
)
def test_a_cut_stream_whose_text_is_not_kept_counts_one_token_per_event(
    wants: bool, action: StreamOptionsAction
) -> None:
    request, answer = _request(wants), _answer(action=action, headers=[])
    tee = tee_for(request, answer, PLAIN)
    assert not tee.keeps_text
    cut = NO_USAGE[: -len(DONE)]  # role, content and finish events; no usage, no [DONE]
    _feed(tee, cut)
    # One role-only event, then about one token per event.
    expected = replace(estimate_usage(MESSAGES, ""), output=cut.count(b"data:") - 1)
    assert usage_of_stream(request, answer, PLAIN, tee) == expected
    assert expected.output == TOKENS + 1  # the finish event counts too


def test_a_responses_answer_without_usage_is_estimated_from_its_output_items() -> None:
    body = {
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
            {"type": "function_call", "name": "f", "arguments": '{"a":1}'},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hello"},
                    {"type": "refusal", "refusal": "no"},
                ],
            },
            "garbage",
        ],
    }
    assert response_texts(body) == ["think", "f", '{"a":1}', "Hello", "no"]
    assert response_texts({"output": None}) == []
