"""One attempt's exchange with its upstream (pure): the path and body it sends, and how the
events of its answer are read. The one place where the client's API and the upstream's may
differ: a Responses API request to a `responses: chat` upstream is meant to become a chat
completion there. That translation is not part of this build: such an attempt fails with a
400 (`translation_unavailable`) naming the upstream.

The answer's way back to the client is `endpoint._RequestFlow._send_answer`: a whole body is
sent as `Answer.head`; a stream goes through the `Tee` that `metering.usage.tee_for` picks,
whose `feed` returns the bytes to relay for each chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.api_request import RESPONSES, ApiRequest, StreamOptionsAction
from proxy.config import Upstream
from proxy.errors import BadRequest
from proxy.sse import Kind, parse, parse_responses

EventReader = Callable[[bytes], tuple[Kind, dict[str, Any] | None]]


def translated(request: ApiRequest, upstream: Upstream) -> bool:
    """Whether this request reaches this upstream in another API than the client's."""
    return request.api is RESPONSES and upstream.responses == "chat"


def upstream_call(
    request: ApiRequest, upstream: Upstream, model: str, action: StreamOptionsAction
) -> tuple[str, bytes]:
    """The path below the upstream's base_url and the body of one attempt."""
    if translated(request, upstream):
        raise BadRequest(
            f"upstream '{upstream.name}' is set to `responses: chat`, and translating the "
            "Responses API to chat completions is not available in this build",
            code="translation_unavailable",
        )
    return request.api.path, request.upstream_body(model, action)


def event_reader(request: ApiRequest, upstream: Upstream) -> EventReader:
    """How the upstream's stream is read up to its first content event (`sse.parse`)."""
    return parse_responses if request.api is RESPONSES else parse
