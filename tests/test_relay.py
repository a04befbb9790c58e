"""The streaming relay: byte-for-byte, unbuffered, and it lets go when the client does."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.mock.content import NEWLINES, stream_events
from proxy.mock.upstream import MockUpstream, expected_content
from proxy.serving import RunningServer
from tests.helpers import FRAMINGS

MESSAGES = [{"role": "user", "content": "有哪些优惠? 🎉"}]


def _body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": True, "seed": 5, **extra}


def _raw(url: str, body: dict[str, Any]) -> tuple[httpx.Headers, bytes]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        return r.headers, b"".join(r.iter_raw())


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"split_utf8": True},
        {"keepalives": 3, "ttft": 0.06},
        {"tokens": 200, "delay": 0},
        {"newline": "crlf", "keepalives": 2, "ttft": 0.04},
        {"newline": "cr", "keepalives": 2, "ttft": 0.04},
        {"newline": "crlf", "split_utf8": True},
    ],
    ids=["plain", "split-utf8", "keepalives", "fast-200-tokens", "crlf", "cr", "crlf-split"],
)
@pytest.mark.parametrize("usage", [True, False], ids=["usage", "no-usage"])
def test_sse_body_is_byte_identical_to_direct(
    proxy: RunningServer, mock_server: RunningServer, knobs: dict[str, Any], usage: bool
) -> None:
    extra: dict[str, Any] = {"mock": knobs}
    if usage:
        extra["stream_options"] = {"include_usage": True}
    _, direct = _raw(mock_server.url, _body("mock-chat", **extra))
    # `verbatim` passes stream_options as the client sent it; with usage asked for, the
    # default route (which requests usage for metering) relays the very same bytes too.
    headers, via = _raw(proxy.url, _body("verbatim", **extra))
    assert via == direct
    if usage:
        assert _raw(proxy.url, _body("support-bot", **extra))[1] == direct
    assert max(via) >= 0x80  # raw multibyte UTF-8 went through, not \\u escapes
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "content-length" not in headers


@FRAMINGS
def test_usage_requested_for_metering_is_hidden_from_a_client_that_did_not_ask(
    proxy: RunningServer, mock_server: RunningServer, mock_app: MockUpstream, newline: str
) -> None:
    knobs = {"mock": {"newline": newline}}
    _, via = _raw(proxy.url, _body("support-bot", **knobs))
    assert mock_app.records[-1].body["stream_options"] == {"include_usage": True}
    usage = {"include_usage": True}
    _, direct = _raw(mock_server.url, _body("mock-chat", stream_options=usage, **knobs))
    boundary = NEWLINES[newline] * 2
    events = direct.split(boundary)
    usage_events = [e for e in events if b'"choices":[]' in e and b'"usage":{' in e]
    assert len(usage_events) == 1
    assert via == boundary.join(e for e in events if e not in usage_events)


@FRAMINGS
def test_first_chunk_reaches_client_while_upstream_is_still_paused(
    proxy: RunningServer, mock_app: MockUpstream, newline: str
) -> None:
    knobs = {"pause_after_first": 1.0, "tokens": 4, "newline": newline}
    body = _body("support-bot", mock=knobs)
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=10) as r:
        chunks = r.iter_raw()
        first = b""
        while b'"content":"' not in first.replace(b'"content":""', b""):
            first += next(chunks)
        record = mock_app.records[-1]
        # The upstream has not finished (it is inside its 1 s pause), yet the content is here.
        assert record.finished is None
        assert record.body["model"] == "mock-chat"
        rest = b"".join(chunks)
    assert rest.endswith(b"data: [DONE]" + NEWLINES[newline] * 2)
    assert record.finished is not None


def test_a_stream_the_proxy_only_reads_is_relayed_piece_by_piece(proxy: RunningServer) -> None:
    """`verbatim` passes stream_options as sent, so without usage asked for the proxy must
    estimate it from every event's text. It adds nothing to the stream, so it holds nothing
    back: once the answer commits, each piece of a split event goes out as it comes."""
    knobs = {"tokens": 2, "split_utf8": True, "split_pause": 0.05}
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json=_body("verbatim", mock=knobs), timeout=10
    ) as r:
        pieces = list(r.iter_raw())
    assert b"".join(pieces).endswith(b"data: [DONE]\n\n")
    # The first piece is the held head (whole events up to the first content; a busy client
    # may read the next piece in the same read); after it, a piece that ends mid-event
    # arrived on its own.
    assert b"\n\n" in pieces[0]
    assert any(not piece.endswith(b"\n\n") for piece in pieces[1:])


def test_client_abort_closes_the_upstream_request(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    body = _body("support-bot", mock={"pause_after_first": 30.0})
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=10) as r:
        next(r.iter_raw())
        record = mock_app.records[-1]
    aborted = time.monotonic()
    deadline = aborted + 5
    while record.disconnected is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.disconnected is not None, "upstream request was not closed"
    assert record.disconnected - aborted < 1.5
    assert record.finished is None


def test_abort_while_waiting_for_first_token_closes_upstream(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    # Keep-alives are not an answer: the proxy holds the response until the first token,
    # so this client gives up waiting for headers.
    body = _body("support-bot", mock={"keepalives": 100, "ttft": 30.0})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=1.0)
    record = next(r for r in reversed(mock_app.records) if r.body.get("mock") == body["mock"])
    deadline = time.monotonic() + 5
    while record.disconnected is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.disconnected is not None
    assert record.finished is None


def test_upstream_reset_mid_stream_ends_with_an_sse_error_event(proxy: RunningServer) -> None:
    body = _body("support-bot", mock={"reset_after": 3})
    _, via = _raw(proxy.url, body)
    events = [e for e in via.split(b"\n\n") if e]
    assert sum(b'"content":"' in e and b'"content":""' not in e for e in events) == 3
    assert events[-1].startswith(b'data: {"error":')
    assert b"upstream_protocol_error" in events[-1]
    assert b"[DONE]" not in via


def test_openai_sdk_raises_on_mid_stream_reset(proxy: RunningServer) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="support-bot",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_body={"mock": {"reset_after": 2}},
    )
    with pytest.raises(openai.APIError, match="closed the connection"):
        for _ in stream:
            pass


def test_upstream_stall_mid_stream_past_read_timeout_is_an_error_event(
    make_proxy: Any,
) -> None:
    proxy = make_proxy(read_timeout=0.5)
    _, via = _raw(proxy.url, _body("support-bot", mock={"pause_after_first": 3.0}))
    assert _cut_after_first_token(via) == {
        "message": "upstream 'mock' timed out while streaming the response",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_timeout",
    }


def test_silence_after_content_longer_than_idle_ends_with_an_error_event(make_proxy: Any) -> None:
    proxy = make_proxy(read_timeout=10, idle=0.5)
    started = time.monotonic()
    _, via = _raw(proxy.url, _body("support-bot", mock={"pause_after_first": 5.0}))
    assert time.monotonic() - started < 4  # the idle limit, not the read timeout, cut it
    assert _cut_after_first_token(via)["code"] == "upstream_timeout"


def _cut_after_first_token(via: bytes) -> Any:
    """The `error` of a support-bot stream (seed 5) cut after its first content event: the
    upstream's role and first content events, unchanged, then the error as an event of its own."""
    upstream = stream_events(5, "mock-chat", 16, "stop", True)  # the proxy asks for usage
    *relayed, error, end = via.split(b"\n\n")
    assert relayed == [upstream.role[:-2], upstream.content[0][:-2]]
    assert end == b""
    assert error.startswith(b"data: ")
    got = orjson.loads(error.removeprefix(b"data: "))
    assert list(got) == ["error"]
    return got["error"]


@pytest.mark.parametrize("newline", ["lf", "crlf"])
@pytest.mark.parametrize("model", ["support-bot", "verbatim"])
def test_a_cut_inside_an_event_is_ended_before_the_error_event(
    proxy: RunningServer, model: str, newline: str
) -> None:
    """The upstream drops the connection after the third content event's data line but before
    the blank line that would end it. The proxy ends that event first, so the SDK reads it and
    then raises the proxy's error, not a JSON error from two data lines run together."""
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    knobs = {"reset_after": 2, "reset_mid_event": True, "newline": newline}
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        seed=5,
        extra_body={"mock": knobs},
    )
    texts: list[str] = []

    def read() -> None:
        for chunk in stream:
            texts.extend(c.delta.content or "" for c in chunk.choices)

    with pytest.raises(openai.APIError, match="closed the connection while streaming") as caught:
        read()
    assert caught.value.code == "upstream_protocol_error"
    assert "".join(texts) == expected_content(5, 3)  # the event whose data line arrived whole
