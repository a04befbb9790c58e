"""Parsing the client's request (pure)."""

from __future__ import annotations

import orjson
import pytest

from proxy.api_request import parse_request
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
