"""One attempt's exchange with its upstream (pure): the path and body it sends, how the
events of its answer are read, and how the answer reaches the client. The one place where the
client's API and the upstream's may differ: a Responses API request to a `responses: chat`
upstream becomes a chat completion there (`proxy.responses`), read to its first content as
chat, and its answer is translated back: a whole body at once (`client_body`), a stream event
by event through the tee (`client_tee`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from proxy.api_request import CHAT, RESPONSES, ApiRequest, StreamOptionsAction
from proxy.config import Upstream
from proxy.metering.tee import Tee
from proxy.metering.usage import tee_for
from proxy.responses import (
    Shell,
    StreamTranslator,
    echo_of,
    response_from_chat,
    translate_request,
)
from proxy.responses.tee import Translating
from proxy.sse import Kind, parse, parse_responses

if TYPE_CHECKING:  # only the type: this module stays free of I/O imports
    from proxy.answer import Answer

EventReader = Callable[[bytes], tuple[Kind, dict[str, Any] | None]]


def translated(request: ApiRequest, upstream: Upstream) -> bool:
    """Whether this request reaches this upstream in another API than the client's."""
    return request.api is RESPONSES and upstream.responses == "chat"


def speaks_stream_options(request: ApiRequest, upstream: Upstream) -> bool:
    """Whether the attempt's API has `stream_options` (the upstream's mode applies)."""
    return request.api.stream_options or translated(request, upstream)


def upstream_call(
    request: ApiRequest, upstream: Upstream, model: str, action: StreamOptionsAction
) -> tuple[str, bytes]:
    """The path below the upstream's base_url and the body of one attempt; a request that
    cannot be translated raises `Untranslatable` (a 400 naming the parameter)."""
    if translated(request, upstream):
        chat = translate_request(request.payload)
        as_chat = ApiRequest(model=model, stream=chat.stream, payload=chat.chat, api=CHAT)
        return CHAT.path, as_chat.upstream_body(model, action)
    return request.api.path, request.upstream_body(model, action)


def event_reader(request: ApiRequest, upstream: Upstream) -> EventReader:
    """How the upstream's stream is read up to its first content event (`sse.parse`)."""
    if request.api is RESPONSES and not translated(request, upstream):
        return parse_responses
    return parse


def client_tee(request: ApiRequest, answer: Answer, upstream: Upstream) -> Tee:
    """What a committed stream goes through on its way to the client (`Tee.feed` returns the
    bytes to relay): for a translated one, the translation."""
    if translated(request, upstream):
        return Translating(StreamTranslator(_shell(request), answer.body_usage))
    return tee_for(request, answer, upstream)


def client_body(request: ApiRequest, answer: Answer, upstream: Upstream) -> bytes:
    """The body of a whole answer as the client gets it: a chat completion translated back."""
    if not translated(request, upstream):
        return answer.head
    return orjson.dumps(response_from_chat(orjson.loads(answer.head), _shell(request)))


def _shell(request: ApiRequest) -> Shell:
    return Shell(echo_of(request.payload))  # the request was translated at each attempt
