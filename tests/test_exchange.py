"""One attempt's exchange (pure): the path and body, and how its events are read."""

from __future__ import annotations

import orjson
import pytest

from proxy.api_request import CHAT, RESPONSES, parse_request
from proxy.config import Upstream
from proxy.errors import BadRequest
from proxy.exchange import event_reader, upstream_call
from proxy.sse import parse, parse_responses

NATIVE = Upstream("native", "http://u/v1")
CHAT_ONLY = Upstream("deepseek", "http://d/v1", responses="chat")


def test_a_native_responses_request_goes_to_responses_as_it_came() -> None:
    request = parse_request(b'{"model":"bot","input":"hi"}', RESPONSES)
    path, body = upstream_call(request, NATIVE, "gpt-x", "inject")
    assert (path, orjson.loads(body)) == ("/responses", {"model": "gpt-x", "input": "hi"})
    assert event_reader(request, NATIVE) is parse_responses


def test_a_chat_request_is_untouched_by_the_responses_setting() -> None:
    request = parse_request(b'{"model":"bot","messages":[{"role":"user","content":"x"}]}', CHAT)
    assert upstream_call(request, CHAT_ONLY, "m", "pass")[0] == "/chat/completions"
    assert event_reader(request, CHAT_ONLY) is parse


def test_a_responses_request_to_a_chat_upstream_says_translation_is_unavailable() -> None:
    request = parse_request(b'{"model":"bot","input":"hi"}', RESPONSES)
    with pytest.raises(BadRequest) as caught:
        upstream_call(request, CHAT_ONLY, "deepseek-chat", "pass")
    assert caught.value.code == "translation_unavailable"
    assert "upstream 'deepseek'" in caught.value.message
