"""What an attempt ends in: a committed `Answer`, which holds its upstream until `aclose`, or
a `Failure` to classify (and relay, if no other candidate does better); `whole_answer` makes
one of them from a complete 2xx body."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from proxy.api_request import ApiRequest, StreamOptionsAction
from proxy.config import Target
from proxy.errors import ProxyError, UpstreamProtocolError
from proxy.headers import Headers, without_content_type
from proxy.health import UpstreamHealth
from proxy.record import AttemptOutcome
from proxy.sse import completion_to_sse

if TYPE_CHECKING:  # only the type: the response is opened in `attempts`, by `upstream`
    from proxy.upstream import UpstreamResponse


class Hold:
    """One round trip's claim on its upstream: an in-flight slot (what `least_inflight`
    orders by) from before the request goes out, and the response once its headers are in.
    `aclose` gives both back, once. The round trip that opened it closes it, unless an
    answer committed: then that `Answer` owns it until `Answer.aclose`."""

    __slots__ = ("_health", "response")

    def __init__(self, health: UpstreamHealth) -> None:
        health.inflight += 1
        self._health: UpstreamHealth | None = health
        self.response: UpstreamResponse | None = None

    async def aclose(self) -> None:
        """Frees the slot and closes the response (which stops an unfinished one upstream)."""
        health, self._health = self._health, None
        if health is None:
            return
        health.inflight -= 1
        if self.response is not None:
            await self.response.aclose()


@dataclass(slots=True)
class Answer:
    """A committed upstream answer: `head` is ready to send, `response` has the rest.

    It holds its upstream (an in-flight slot, an open response) until `aclose`, which the
    endpoint calls once the answer is sent or will never be; a hedge loser is closed the same
    way. Built without a hold (tests), `aclose` has nothing to give back."""

    target: Target
    status: int
    headers: Headers
    head: bytes
    response: UpstreamResponse | None = None  # the stream with the rest; None: head is all
    first_event: dict[str, Any] | None = None  # the first content event, a template for usage
    stream_options: StreamOptionsAction = "pass"
    body_usage: dict[str, Any] | None = None  # the usage object of a whole JSON answer
    hold: Hold | None = field(default=None, repr=False)

    async def aclose(self) -> None:
        if self.hold is not None:
            await self.hold.aclose()


@dataclass(slots=True)
class Failure:
    target: Target | None
    outcome: AttemptOutcome
    error: ProxyError | None = None  # ours; else the upstream's own answer below
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    retry_after: float | None = None
    may_retry: bool = True  # False: the client is told not to send it again (x-should-retry)


def whole_answer(
    request: ApiRequest,
    target: Target,
    action: StreamOptionsAction,
    response: UpstreamResponse,
    payload: bytes,
) -> Answer | Failure:
    """A complete 2xx body: a chat completion, or not an answer at all."""
    headers = response.headers
    completion = completion_of(payload)  # parsed once; its usage travels on the Answer
    if completion is None:  # an HTML error page with a 200, say: not an answer
        odd = f"upstream '{target.upstream}' answered {response.status} without a completion"
        return Failure(target, "reset", UpstreamProtocolError(odd))
    usage = completion.get("usage")
    reported = usage if isinstance(usage, dict) else None
    if request.stream:  # JSON for a stream request: give the client a stream
        converted = completion_to_sse(payload, with_usage=request.wants_usage)
        if converted is not None:
            sse_headers = [(b"content-type", b"text/event-stream"), *without_content_type(headers)]
            return Answer(
                target, response.status, sse_headers, converted,
                stream_options=action, body_usage=reported,
            )  # fmt: skip
    return Answer(
        target, response.status, headers, payload, stream_options=action, body_usage=reported
    )


def completion_of(body: bytes) -> dict[str, Any] | None:
    """The body as an answer (an object with `choices`, embeddings' `data`, or the Responses
    API's `response` object), or None."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict) and (
        isinstance(parsed.get("choices"), list)
        or isinstance(parsed.get("data"), list)
        or parsed.get("object") == "response"
    ):
        return parsed
    return None
