"""POST /v1/chat/completions: admission → route choice → upstream call → relay."""

from __future__ import annotations

import asyncio
import contextlib
import time

from proxy.asgi import ClientWatch, Receive, Scope, Send, read_body, send_body, send_error
from proxy.chat_request import ChatRequest, parse_chat_request
from proxy.config import Target
from proxy.errors import ModelNotFound, ProxyError
from proxy.headers import client_response_headers, request_id, upstream_request_headers
from proxy.record import Observer, RequestRecord
from proxy.relay import relay_stream
from proxy.routing import plan
from proxy.state import AppState, StateRef


class ChatCompletions:
    """A raw ASGI endpoint, so no middleware or response object wraps the stream."""

    def __init__(self, ref: StateRef, observe: Observer) -> None:
        self._ref = ref
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(scope, receive, send)
        started = time.perf_counter()
        try:
            await exchange.run(self._ref)
        finally:
            exchange.record.duration_ms = round((time.perf_counter() - started) * 1000, 2)
            with contextlib.suppress(Exception):  # observers watch; they never break a request
                self._observe(exchange.record)


class _Exchange:
    """One request's way through the pipeline."""

    __slots__ = ("receive", "record", "rid", "scope", "send")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.rid = request_id(scope["headers"])
        self.record = RequestRecord(request_id=self.rid.decode())

    async def run(self, ref: StateRef) -> None:
        try:
            state = ref.get()
            body = await read_body(self.scope, self.receive, state.config.server.max_body_bytes)
            request = parse_chat_request(body)
            target = _choose(state, request.model)
        except ProxyError as exc:
            await self._fail(exc)
            return
        record = self.record
        record.route, record.upstream, record.model = request.model, target.upstream, target.model
        record.stream = request.stream
        watch = ClientWatch(self.receive)
        try:
            await self._forward(state, target, request, watch)
        except asyncio.CancelledError:
            if not watch.client_gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # always in a task
            record.client_disconnected = True
        finally:
            watch.close()

    async def _forward(
        self, state: AppState, target: Target, request: ChatRequest, watch: ClientWatch
    ) -> None:
        upstream = state.config.upstreams[target.upstream]
        headers = upstream_request_headers(self.scope["headers"], self.rid)
        try:
            response = await state.clients.send(
                upstream, "/chat/completions", request.upstream_body(target.model), headers
            )
        except ProxyError as exc:
            watch.done = True
            await self._fail(exc)
            return
        self.record.status = response.status
        headers = client_response_headers(response.headers, self.rid)
        if 200 <= response.status < 300 and response.content_type.startswith("text/event-stream"):
            failure = await relay_stream(self.send, response, headers, watch)
            if failure is not None:
                self.record.error, self.record.message = failure.code, failure.message
            return
        # Non-stream answers (and upstream errors) are small: read whole, so a failure while
        # reading can still become a proper error status instead of a truncated body.
        try:
            payload = await response.read()
        except ProxyError as exc:
            watch.done = True
            await self._fail(exc)
            return
        finally:
            await response.aclose()
        watch.done = True
        await send_body(self.send, response.status, payload, headers)

    async def _fail(self, exc: ProxyError) -> None:
        self.record.fail(exc.status, exc.code, exc.message)
        await send_error(self.send, exc, [(b"x-request-id", self.rid)])


def _choose(state: AppState, model: str) -> Target:
    route = state.config.route(model)
    if route is None:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    return plan(route, state.rng)[0]
