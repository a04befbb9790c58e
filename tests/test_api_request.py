"""Parsing the client's request (pure)."""

from __future__ import annotations

import orjson
import pytest

from proxy.api_request import MAX_DEPTH, RESPONSES, parse_request
from proxy.errors import BadRequest


def test_upstream_body_replaces_only_the_model() -> None:
    body = (
        b'{"model":"support-bot","messages":[{"role":"user","content":"\xe4\xbd\xa0"}],'
        b'"temperature":0.7,"future_param":{"x":[1,2.5,null]},"stream":true}'
    )
    request = parse_request(body)
    assert request.stream is True
    out = orjson.loads(request.upstream_body("deepseek-chat"))
    assert out == {**orjson.loads(body), "model": "deepseek-chat"}
    assert list(out) == list(orjson.loads(body))  # key order kept


def test_stream_null_means_false() -> None:
    assert parse_request(b'{"model":"m","messages":[{}],"stream":null}').stream is False


@pytest.mark.parametrize(
    "body",
    [b"", b"null", b'{"model":"","messages":[{}]}', b'{"model":"m","messages":[]}'],
)
def test_rejects(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(body)


def _nested(levels: int) -> bytes:
    """A valid request whose deepest value sits `levels` deep, the body object counted."""
    inner = levels - 1
    return b'{"model":"m","messages":[{}],"x":' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize(
    ("body", "served"),
    [
        (_nested(MAX_DEPTH), True),
        (_nested(MAX_DEPTH + 1), False),
        (_nested(1023), False),  # as deep as orjson reads
        (b'{"model":"m","messages":[' + b",".join([b"{}"] * 2000) + b"]}", True),  # wide
    ],
    ids=["at-the-limit", "one-past", "deepest-json-read", "many-brackets-shallow"],
)
def test_bodies_deeper_than_the_serialiser_writes_are_refused(body: bytes, served: bool) -> None:
    """Found when the first attempt's body is written (never serialised twice for it)."""
    request = parse_request(body)
    if served:
        assert orjson.loads(request.upstream_body("x"))["model"] == "x"
        assert request.upstream_body("x") is request.upstream_body("x")  # written once
        return
    with pytest.raises(BadRequest) as refused:
        request.upstream_body("x")
    assert refused.value.code == "invalid_json"
    assert refused.value.message == f"request body is nested more than {MAX_DEPTH} levels deep"


def test_a_responses_request_is_sent_as_it_came_without_stream_options() -> None:
    body = b'{"model":"bot","input":"hi","instructions":"be brief","stream":true,"store":false}'
    request = parse_request(body, RESPONSES)
    assert request.stream is True
    for action in ("pass", "strip", "inject"):
        sent = orjson.loads(request.upstream_body("gpt-x", action))  # type: ignore[arg-type]
        assert sent == {**orjson.loads(body), "model": "gpt-x"}
    assert request.prompt == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert request.counts_messages


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"input":"hi"}', "model"),
        (b'{"model":"m","input":3}', "input"),
        (b'{"model":"m","input":"hi","stream":"yes"}', "stream"),
    ],
)
def test_a_bad_responses_request_names_the_parameter(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(body, RESPONSES)
    assert caught.value.param == param


def test_a_responses_request_may_leave_input_out() -> None:
    """With a stored `prompt` template, say: the upstream decides."""
    request = parse_request(b'{"model":"m","prompt":{"id":"pmpt_1"}}', RESPONSES)
    assert request.prompt == []
