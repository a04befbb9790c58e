"""A Responses API response, after it was made: `GET`/`DELETE /v1/responses/{id}`,
`GET .../input_items` and `POST .../cancel` go to the upstream that created it, with that
upstream's key; and a request's `previous_response_id` is routed there too.

The proxy learns who created a response from its answer: the `response.created` event at
the head of a stream (held at commit already), or a whole body's `id`. `Runtime.owners`
keeps it (`proxy.fleet.owners`: in the process, and in Redis with `state.url`). An id the
proxy does not know, or one another client key created, is a 404 that says why.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace

import orjson

from proxy.admission import check_model, identify
from proxy.answer import Answer
from proxy.api_request import ApiRequest
from proxy.asgi import Receive, Scope, Send, send_body, send_error
from proxy.config import Route, Upstream
from proxy.errors import NotFound, ProxyError, UpstreamTimeout, clipped
from proxy.fleet import LocalOwners, Owner
from proxy.headers import (
    Headers,
    client_response_headers,
    request_id,
    upstream_request_headers,
)
from proxy.record import RequestRecord
from proxy.responses import is_translated_id
from proxy.scrub import scrub_key
from proxy.sse import EventSplitter, event_data, response_id
from proxy.state import AppState, Runtime, StateRef

# OpenAI's ids are `resp_` and hex; anything that could not be a path segment is refused.
_ID = re.compile(r"[A-Za-z0-9_\-]{1,200}")
_ACTIONS = {("GET", ""), ("DELETE", ""), ("GET", "input_items"), ("POST", "cancel")}


def learn(state: AppState, answer: Answer, route: str, key: str | None) -> None:
    """Remembers who created the response in `answer` (a committed `/v1/responses` answer):
    its head holds the whole body, or the stream's first events."""
    rid = _stream_id(answer.head) if answer.response is not None else _body_id(answer.head)
    if rid is not None and 200 <= answer.status < 300:
        owner = Owner(answer.target.upstream, route, key)
        state.runtime.owners.remember(rid, owner)


def _stream_id(head: bytes) -> str | None:
    for event in EventSplitter().feed(head):  # `response.created` comes first
        data = event_data(event)
        if data is None:  # a comment
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return response_id(payload) if isinstance(payload, dict) else None
    return None


def _body_id(body: bytes) -> str | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    rid = payload.get("id") if isinstance(payload, dict) else None
    return rid if isinstance(rid, str) else None


async def pinned(route: Route, request: ApiRequest, owners: LocalOwners) -> Route:
    """With `previous_response_id` known to have come from one of this route's upstreams,
    only that upstream can continue it: the route narrowed to it. Otherwise the route as
    it is (the upstream it picks will answer for itself)."""
    previous = request.payload.get("previous_response_id")
    if not isinstance(previous, str):
        return route
    owner = (await owners.find(previous)).owner
    if owner is None:
        return route
    holders = tuple(t for t in route.targets + route.fallbacks if t.upstream == owner.upstream)
    return replace(route, targets=holders[:1], fallbacks=()) if holders else route


class RetrievalEndpoint:
    """`/v1/responses/{id}[/input_items|/cancel]`, a raw ASGI endpoint."""

    def __init__(self, ref: StateRef, runtime: Runtime) -> None:
        self._ref, self._runtime = ref, runtime  # its observers are set up in the lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid, arrived = request_id(scope["headers"]), time.perf_counter()
        record = RequestRecord(request_id=rid.decode(), api="responses")
        try:
            status, body, headers = await self._relay(scope, record, rid)
        except ProxyError as exc:
            record.fail(exc.status, exc.code, exc.message)
            await send_error(send, exc, [(b"x-request-id", rid)])
        else:
            record.status = status
            await send_body(send, status, body, headers)
        finally:
            record.duration_s = time.perf_counter() - arrived
            self._runtime.observers.finished(record)

    async def _relay(
        self, scope: Scope, record: RequestRecord, rid: bytes
    ) -> tuple[int, bytes, Headers]:
        state = self._ref.get()
        config = state.config
        key = identify(config, scope["headers"])
        record.key_name = key.name if key is not None else None
        response_id_, _, action = scope["path"].removeprefix("/v1/responses/").partition("/")
        method = scope["method"]
        if (method, action) not in _ACTIONS or not _ID.fullmatch(response_id_):
            raise NotFound("no such path")
        found = await state.runtime.owners.find(response_id_)
        owner = found.owner
        if owner is None or (key is not None and owner.key != key.name):
            raise NotFound(_unknown(response_id_, found.partial, config.server.max_echoed_chars))
        check_model(key, owner.route)
        upstream = config.upstreams.get(owner.upstream)
        if upstream is None:
            gone = f"upstream '{owner.upstream}', which created this response, is gone"
            raise NotFound(f"{gone} from the config")
        record.route, record.upstream = owner.route, upstream.name
        status, payload, answered = await _call(state, upstream, scope, rid)
        if status < 400 and method == "DELETE":
            await state.runtime.owners.forget(response_id_)
        return status, payload, client_response_headers(answered, rid)


async def _call(
    state: AppState, upstream: Upstream, scope: Scope, rid: bytes
) -> tuple[int, bytes, Headers]:
    """The client's retrieval, relayed with the upstream's key (the client's stays here),
    read whole within the upstream's timeouts; an error answer with the key scrubbed."""
    headers = upstream_request_headers(scope["headers"], rid)
    path, method = scope["path"].removeprefix("/v1"), scope["method"]
    query = scope.get("query_string", b"").decode("latin-1")
    try:
        async with asyncio.timeout(upstream.timeouts.total or upstream.timeouts.read):
            response = await state.clients.send(
                upstream, path, b"", headers, method=method, query=query
            )
            try:
                payload = await response.read(upstream.max_response_bytes)
            finally:
                await response.aclose()
    except TimeoutError:
        raise UpstreamTimeout(f"upstream '{upstream.name}' did not answer in time") from None
    if response.status >= 400:
        payload, scrubbed = scrub_key(upstream, payload, response.headers)
        return response.status, payload, scrubbed
    return response.status, payload, response.headers


def _unknown(rid: str, partial: bool, most: int) -> str:
    if is_translated_id(rid):
        return (
            f"response '{clipped(rid, most)}' was translated from a chat completion "
            "(`responses: chat`), and translated responses are not stored"
        )
    why = (
        f"response '{clipped(rid, most)}' was not created through this proxy, or its record expired"
    )
    if partial:
        why += " (the fleet's state store could not be reached: only this process's were searched)"
    return why
