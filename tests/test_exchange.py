"""One attempt's exchange (pure): the path and body, and how its events are read; a Responses
request to a `responses: chat` upstream goes as chat."""

from __future__ import annotations

import orjson
import pytest

from proxy.api_request import CHAT, RESPONSES, StreamOptionsAction, parse_request
from proxy.config import Upstream
from proxy.errors import Untranslatable
from proxy.exchange import event_reader, speaks_stream_options, upstream_call
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


@pytest.mark.parametrize(
    ("action", "options"),
    [("inject", {"include_usage": True}), ("pass", {"include_usage": True}), ("strip", None)],
)
def test_a_responses_request_to_a_chat_upstream_goes_as_chat(
    action: StreamOptionsAction, options: dict[str, bool] | None
) -> None:
    body = b'{"model":"bot","input":"hi","instructions":"Be brief.","stream":true}'
    request = parse_request(body, RESPONSES)
    path, sent = upstream_call(request, CHAT_ONLY, "deepseek-chat", action)
    assert path == "/chat/completions"
    assert orjson.loads(sent) == {
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        "stream": True,
        **({} if options is None else {"stream_options": options}),
    }
    assert event_reader(request, CHAT_ONLY) is parse  # read to its first content as chat
    assert speaks_stream_options(request, CHAT_ONLY)
    assert not speaks_stream_options(request, NATIVE)


def test_what_a_chat_upstream_cannot_take_is_refused_naming_it() -> None:
    request = parse_request(b'{"model":"bot","input":"hi","background":true}', RESPONSES)
    with pytest.raises(Untranslatable) as caught:
        upstream_call(request, CHAT_ONLY, "deepseek-chat", "pass")
    assert caught.value.param == "background"
    assert upstream_call(request, NATIVE, "gpt-x", "pass")[0] == "/responses"  # native takes it
