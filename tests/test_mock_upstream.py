"""The mock upstream, served for real on loopback and read with httpx and the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.mock.content import MULTIBYTE, NEWLINES, draw_tokens, stream_events
from proxy.mock.upstream import (
    Knobs,
    MockUpstream,
    RequestRecord,
    count_prompt_tokens,
    expected_content,
)
from proxy.serving import RunningServer

# Any: the SDK wants its TypedDicts, count_prompt_tokens plain dicts.
MESSAGES: Any = [
    {"role": "system", "content": "You are a shop assistant."},
    {"role": "user", "content": "双十一 has which deals?"},
]
PROMPT_TOKENS = count_prompt_tokens(MESSAGES)


@pytest.fixture(scope="module")
def mock() -> Iterator[tuple[MockUpstream, RunningServer]]:
    app = MockUpstream(Knobs(ttft=0.01, delay=0.001))
    with RunningServer(app) as server:
        yield app, server


@pytest.fixture
def app(mock: tuple[MockUpstream, RunningServer]) -> MockUpstream:
    return mock[0]


@pytest.fixture
def url(mock: tuple[MockUpstream, RunningServer]) -> str:
    return mock[1].url


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt-4o", "messages": MESSAGES, **extra}


def _post(url: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def _raw(url: str, body: dict[str, Any], **headers: str) -> tuple[httpx.Response, list[bytes]]:
    """The streamed body as the chunks the client received."""
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as r:
        return r, list(r.iter_raw())


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e[6:]) for e in _events(raw) if e.startswith(b"data: {")]


def _wait_for(record: RequestRecord, attr: str, timeout: float = 1.0) -> float:
    deadline = time.monotonic() + timeout
    while getattr(record, attr) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    value = getattr(record, attr)
    assert value is not None, f"record.{attr} was not set within {timeout} s"
    return float(value)


# -- content ------------------------------------------------------------------------------


def test_expected_content_is_deterministic_multibyte_and_prefix_stable() -> None:
    assert expected_content(1, 16) == expected_content(1, 16)
    assert expected_content(1, 16) != expected_content(2, 16)
    assert expected_content(1, 16).startswith(expected_content(1, 5))
    assert draw_tokens(9, 1)[0] in MULTIBYTE
    assert expected_content(0, 0) == ""


def test_count_prompt_tokens() -> None:
    assert count_prompt_tokens([]) == 0
    assert count_prompt_tokens([{"role": "user", "content": "hello  big world"}]) == 4 + 3
    assert count_prompt_tokens([{"role": "user", "content": "双十一 ok"}]) == 4 + 3 + 1
    parts = [{"type": "text", "text": "a b"}, {"type": "image_url", "image_url": {}}]
    assert count_prompt_tokens([{"role": "user", "content": parts}, {"role": "user"}]) == 4 + 2 + 4


# -- openai SDK ---------------------------------------------------------------------------


def test_openai_sdk_non_stream(url: str, app: MockUpstream) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    got = client.chat.completions.create(
        model="mock-gpt-4o",
        messages=MESSAGES,
        seed=5,
        extra_body={"mock": {"tokens": 12}},
    )
    assert got.id == "chatcmpl-mock-5"
    assert got.model == "mock-gpt-4o"
    assert got.choices[0].message.content == expected_content(5, 12)
    assert got.choices[0].finish_reason == "stop"
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (PROMPT_TOKENS, 12)
    assert got.usage.total_tokens == PROMPT_TOKENS + 12
    record = app.records[-1]
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT_TOKENS, 12)
    assert record.finished is not None
    assert record.disconnected is None


def test_openai_sdk_stream_with_usage(url: str, app: MockUpstream) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="mock-gpt-4o",
        messages=MESSAGES,
        seed=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert text == expected_content(8, 16)
    assert finish == "stop"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 16)
    assert app.records[-1].sent_tokens == 16


# -- stream shape -------------------------------------------------------------------------


def test_stream_is_deterministic_per_seed(url: str) -> None:
    r, first = _raw(url, _body(stream=True, seed=3))
    _, second = _raw(url, _body(stream=True, seed=3))
    _, other = _raw(url, _body(stream=True, seed=4))
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert b"".join(first) == b"".join(second)
    assert b"".join(first) != b"".join(other)
    assert _post(url, _body(seed=3)).content == _post(url, _body(seed=3)).content


def test_stream_events_are_compact_orjson_in_openai_order(url: str) -> None:
    _, chunks = _raw(url, _body(stream=True, seed=11, mock={"tokens": 5}))
    events = _events(b"".join(chunks))
    assert events[-1] == b"data: [DONE]"
    for event in events[:-1]:
        assert event == b"data: " + orjson.dumps(orjson.loads(event[6:]))
    parsed = _chunks(b"".join(chunks))
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == (
        expected_content(11, 5)
    )
    assert parsed[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(c["id"] == "chatcmpl-mock-11" and c["created"] == 1700000000 for c in parsed)
    assert all("usage" not in c for c in parsed)  # no include_usage: no usage key, no usage chunk


def test_include_usage_adds_a_usage_chunk_and_nulls_elsewhere(url: str) -> None:
    body = _body(stream=True, stream_options={"include_usage": True}, mock={"tokens": 3})
    _, chunks = _raw(url, body)
    parsed = _chunks(b"".join(chunks))
    assert all(c["usage"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
    }


def test_keepalives_precede_the_first_content_event(url: str) -> None:
    _, chunks = _raw(url, _body(stream=True, mock={"keepalives": 3, "ttft": 0.2}))
    raw = b"".join(chunks)
    assert raw.startswith(b": keep-alive\n\n" * 3 + b"data: {")
    assert raw.count(b": keep-alive") == 3


@pytest.mark.parametrize("newline", ["crlf", "cr"])
def test_newline_frames_every_line_and_keepalive_with_crlf_or_cr(url: str, newline: str) -> None:
    knobs = {"tokens": 4, "keepalives": 2, "ttft": 0.02}
    body = _body(stream=True, seed=6, stream_options={"include_usage": True}, mock=knobs)
    _, lf = _raw(url, body)
    _, framed = _raw(url, {**body, "mock": {**knobs, "newline": newline}})
    nl = NEWLINES[newline]
    assert b"".join(framed) == b"".join(lf).replace(b"\n", nl)
    assert b"".join(framed).startswith(b": keep-alive" + nl * 2)
    assert b"".join(framed).endswith(b"data: [DONE]" + nl * 2)
    if newline == "cr":
        assert b"\n" not in b"".join(framed)


@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_reset_mid_event_drops_the_connection_before_an_event_ends(
    url: str, app: MockUpstream, newline: str
) -> None:
    """The third content event's data line arrives whole; the blank line that would end the
    event never does."""
    received: list[bytes] = []
    knobs = {"reset_after": 2, "reset_mid_event": True, "tokens": 10, "newline": newline}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST", url + "/v1/chat/completions", json=_body(stream=True, seed=2, mock=knobs)
        ) as r,
    ):
        received.extend(r.iter_raw())
    events = stream_events(2, "mock-gpt-4o", 10, "stop", False)
    whole = events.role + events.content[0] + events.content[1] + events.content[2][:-1]
    assert b"".join(received) == whole.replace(b"\n", NEWLINES[newline])
    assert app.records[-1].sent_tokens == 2
    assert app.records[-1].disconnected is None


def test_stall_holds_the_body_after_the_headers(url: str) -> None:
    body = _body(stream=True, mock={"stall": 0.3, "ttft": 0})
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        headers_at = time.monotonic()
        chunks = r.iter_raw()
        first = next(chunks)
        assert time.monotonic() - headers_at >= 0.25
        assert first.startswith(b"data: {")
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")


def test_max_tokens_caps_with_finish_reason_length(url: str, app: MockUpstream) -> None:
    got = _post(url, _body(seed=2, max_tokens=4)).json()
    assert got["choices"][0]["message"]["content"] == expected_content(2, 4)
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 4
    _, chunks = _raw(url, _body(stream=True, seed=2, max_completion_tokens=4))
    parsed = _chunks(b"".join(chunks))
    assert sum("content" in c["choices"][0]["delta"] for c in parsed) == 5  # role + 4
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    assert app.records[-1].completion_tokens == 4
    assert _post(url, _body(max_tokens=100)).json()["choices"][0]["finish_reason"] == "stop"


# -- knobs ----------------------------------------------------------------------------------


def test_reject_stream_options(url: str) -> None:
    mock = {"reject_stream_options": True}
    r = _post(url, _body(stream=True, stream_options={"include_usage": True}, mock=mock))
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "Unknown parameter: stream_options",
            "type": "invalid_request_error",
            "param": "stream_options",
            "code": None,
        }
    }
    _, chunks = _raw(url, _body(stream=True, mock=mock))
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")


def test_usage_headers(url: str) -> None:
    r = _post(url, _body(mock={"usage_headers": True, "tokens": 7}))
    assert r.headers["x-prompt-tokens"] == str(PROMPT_TOKENS)
    assert r.headers["x-completion-tokens"] == "7"
    streamed, _ = _raw(url, _body(stream=True, mock={"usage_headers": True, "tokens": 7}))
    assert streamed.headers["x-completion-tokens"] == "7"
    assert "x-prompt-tokens" not in _post(url, _body()).headers


def test_json_for_stream(url: str) -> None:
    r = _post(url, _body(stream=True, seed=6, mock={"json_for_stream": True}))
    assert r.headers["content-type"] == "application/json"
    assert r.content == _post(url, _body(seed=6)).content


@pytest.mark.parametrize("stream", [False, True])
def test_injected_error_status(url: str, stream: bool) -> None:
    r = _post(url, _body(stream=stream, mock={"status": 503, "retry_after": 2}))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "2"
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    limited = _post(url, _body(mock={"status": 429}))
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" not in limited.headers


def test_echo_auth_quotes_the_authorization_header_in_an_injected_error(url: str) -> None:
    sent = "Bearer sk-proj-echoed-0123456789"
    r = _post(url, _body(mock={"status": 401, "echo_auth": True}), authorization=sent)
    assert r.status_code == 401
    assert r.json()["error"]["message"].endswith(f"credentials not accepted: '{sent}'")
    assert sent in r.headers["www-authenticate"]
    plain = _post(url, _body(mock={"status": 401}), authorization=sent)
    assert sent not in plain.text
    assert "www-authenticate" not in plain.headers


@pytest.mark.parametrize(("stream", "status"), [(False, None), (True, None), (False, 500)])
def test_set_cookie_adds_a_cookie_and_a_hop_by_hop_header(
    url: str, stream: bool, status: int | None
) -> None:
    r = _post(url, _body(stream=stream, mock={"set_cookie": True, "status": status}))
    assert r.status_code == (status or 200)
    assert r.headers["set-cookie"].startswith("__cf_bm=")
    assert r.headers["keep-alive"] == "timeout=5, max=100"
    assert "set-cookie" not in _post(url, _body()).headers


def test_openai_sdk_sees_injected_rate_limit(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="mock-gpt-4o",
            messages=MESSAGES,
            extra_body={"mock": {"status": 429, "retry_after": 0.5}},
        )


def test_split_utf8_cuts_inside_characters_without_changing_bytes(url: str) -> None:
    _, whole = _raw(url, _body(stream=True, seed=1, mock={"tokens": 6}))
    _, split = _raw(url, _body(stream=True, seed=1, mock={"tokens": 6, "split_utf8": True}))
    assert b"".join(split) == b"".join(whole)
    assert len(split) > len(whole)
    torn = 0
    for piece in split:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            torn += 1
    assert torn > 0, "no chunk boundary fell inside a multibyte character"


def test_split_pause_spaces_the_pieces_of_an_event(url: str, app: MockUpstream) -> None:
    """With a long pause the client reads each piece alone: the first is one byte, and the
    stream is still unfinished when it arrives."""
    body = _body(stream=True, mock={"tokens": 1, "split_utf8": True, "split_pause": 0.2})
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        pieces = r.iter_raw()
        assert next(pieces) == b"d"  # `data: ...` cut after its first byte
        assert app.records[-1].finished is None
        rest = b"".join(pieces)
    assert rest.endswith(b"data: [DONE]\n\n")


def test_reset_after_drops_the_connection(url: str, app: MockUpstream) -> None:
    received: list[bytes] = []

    def read() -> None:
        body = _body(stream=True, mock={"reset_after": 3, "tokens": 10})
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            received.extend(r.iter_raw())

    with pytest.raises(httpx.RemoteProtocolError):
        read()
    events = _events(b"".join(received))
    assert sum(b'"delta":{"content":' in e for e in events) == 3
    assert b"[DONE]" not in b"".join(received)
    record = app.records[-1]
    assert record.finished is not None
    assert record.disconnected is None
    assert record.sent_tokens == 3
    assert _post(url, _body()).status_code == 200  # the server carries on


def test_client_disconnect_is_noticed_promptly(url: str, app: MockUpstream) -> None:
    body = _body(stream=True, mock={"pause_after_first": 5, "tokens": 4})
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        seen = b""
        chunks = r.iter_raw()
        while b'"delta":{"content":' not in seen:
            seen += next(chunks)
        record = app.records[-1]
    closed = time.monotonic()
    assert _wait_for(record, "disconnected") - closed < 1.0
    assert record.finished is None
    assert record.sent_tokens == 1


def test_knobs_via_body_and_header_header_wins(url: str, app: MockUpstream) -> None:
    got = _post(url, _body(mock={"tokens": 3})).json()
    assert got["usage"]["completion_tokens"] == 3
    header = orjson.dumps({"tokens": 5}).decode()
    got = _post(url, _body(mock={"tokens": 3, "usage_headers": True}), **{"x-mock": header})
    assert got.json()["usage"]["completion_tokens"] == 5
    assert got.headers["x-completion-tokens"] == "5"  # body knobs the header left alone apply
    assert b'"mock"' not in got.content
    assert app.records[-1].body["mock"] == {"tokens": 3, "usage_headers": True}
    assert app.records[-1].headers["x-mock"] == header


@pytest.mark.parametrize(
    ("knobs", "header", "param"),
    [
        ({"warp": 1}, None, "mock.warp"),
        ({"tokens": "many"}, None, "mock.tokens"),
        ({"tokens": True}, None, "mock.tokens"),
        ({"ttft": -1}, None, "mock.ttft"),
        ({"status": 200}, None, "mock.status"),
        ([1, 2], None, "mock"),
        (None, '{"split_utf8": 1}', "mock.split_utf8"),
        ({"newline": "lfcr"}, None, "mock.newline"),
        ({"newline": True}, None, "mock.newline"),
        (None, "not json", "x-mock"),
        ({"replay": "../routes"}, None, "mock.replay"),
        ({"replay": "deepseek"}, None, "mock.replay"),  # this mock has no replay_dir
    ],
)
def test_bad_knobs_are_400(url: str, knobs: Any, header: str | None, param: str) -> None:
    body = _body() if knobs is None else _body(mock=knobs)
    r = _post(url, body, **({} if header is None else {"x-mock": header}))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.removeprefix("mock.") in error["message"]


def test_fault_knobs_are_obeyed_only_by_a_mock_made_with_faults(url: str) -> None:
    """One body to two mocks, as the proxy sends it to a route's candidates: the one made with
    `faults=True` fails, the other answers as a healthy upstream does."""
    body = _body(mock={"tokens": 3}, fault={"status": 503, "tokens": 5})
    faulty = MockUpstream(Knobs(ttft=0.01, delay=0.001), faults=True)
    with RunningServer(faulty) as server:
        assert _post(server.url, body).status_code == 503
        healthy_knobs = _body(mock={"tokens": 3}, fault={"tokens": 5})
        assert _post(server.url, healthy_knobs).json()["usage"]["completion_tokens"] == 5
        header = orjson.dumps({"tokens": 7}).decode()
        got = _post(server.url, healthy_knobs, **{"x-mock": header}).json()
        assert got["usage"]["completion_tokens"] == 7  # mock, then fault, then the header
        bad = _post(server.url, _body(fault={"warp": 1}))
        assert (bad.status_code, bad.json()["error"]["param"]) == (400, "fault.warp")
    healthy = _post(url, body)
    assert healthy.status_code == 200
    assert healthy.json()["usage"]["completion_tokens"] == 3


def test_keep_records_keeps_the_latest_only() -> None:
    app = MockUpstream(Knobs(ttft=0.0, delay=0.0), keep_records=2)
    with RunningServer(app) as server:
        for seed in range(7):
            assert _post(server.url, _body(seed=seed, mock={"tokens": 1})).status_code == 200
            assert 1 <= len(app.records) <= 4
    # Over 2 x 2 at the 5th request, cut to the latest 2; then two more.
    assert [r.body["seed"] for r in app.records] == [3, 4, 5, 6]


def test_replay_sends_a_recording_byte_for_byte(tmp_path: Path) -> None:
    events = b': queued\n\ndata: {"id":"x"}\n\ndata: [DONE]\n\n'
    (tmp_path / "shop-stream.sse").write_bytes(b"# where it comes from\n#\n" + events)
    (tmp_path / "shop-body.json").write_bytes(b'# from the docs\n{"id": "x"}\n')
    app = MockUpstream(Knobs(ttft=0, delay=0), replay_dir=tmp_path)
    with RunningServer(app) as server:
        knobs = {"replay": "shop", "replay_pause_at": 2, "pause_after_first": 10}
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=_body(stream=True, mock=knobs)
        ) as r:
            got = b""
            for piece in r.iter_raw():  # the pause holds the last event back
                got += piece
                if got == events[:-14]:  # two of its three events
                    break
        assert r.headers["content-type"] == "text/event-stream"
        assert app.records[-1].finished is None
        r, raw = _raw(server.url, _body(stream=True, mock={"replay": "shop"}))
        assert b"".join(raw) == events
        body = _post(server.url, _body(mock={"replay": "shop"}))
        assert body.content == b'{"id": "x"}\n'
        assert body.headers["content-type"] == "application/json"
        missing = _post(server.url, _body(mock={"replay": "other"}))
        assert (missing.status_code, missing.json()["error"]["param"]) == (400, "mock.replay")


# -- routes ---------------------------------------------------------------------------------


def test_other_routes(url: str) -> None:
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["mock-gpt-4o", "mock-gpt-4o-mini"]
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    for method, path in [("GET", "/v1/nope"), ("GET", "/v1/chat/completions")]:
        r = httpx.request(method, url + path)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_invalid_json_is_400(url: str, content: bytes) -> None:
    r = httpx.post(url + "/v1/chat/completions", content=content, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_seed_is_400(url: str) -> None:
    r = _post(url, _body(seed="x"))
    assert (r.status_code, r.json()["error"]["param"]) == (400, "seed")
