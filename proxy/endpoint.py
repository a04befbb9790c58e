"""POST /v1/chat/completions (and /v1/completions, /v1/embeddings): admission → route choice →
attempts → relay → metering."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

from proxy.admission import check_model, identify
from proxy.api_request import CHAT, Api, ApiRequest, parse_request
from proxy.asgi import (
    ClientGone,
    ClientWatch,
    Receive,
    Scope,
    Send,
    read_body,
    send_body,
    send_error,
)
from proxy.attempts import Answer, Attempts, Failure
from proxy.errors import InternalError, ModelNotFound, ProxyError, UpstreamProtocolError
from proxy.headers import client_response_headers, request_id, upstream_request_headers
from proxy.metering.cost import cost_usd
from proxy.metering.usage import tee_for, usage_of_body, usage_of_stream
from proxy.record import Observers, RequestRecord, Usage
from proxy.relay import end_with_error, open_stream, relay, send_comment
from proxy.state import AppState, Overloaded, Runtime, StateRef

SSE_TYPE = [(b"content-type", b"text/event-stream")]


class ApiEndpoint:
    """A raw ASGI endpoint, so no middleware or response object wraps the stream."""

    def __init__(self, ref: StateRef, runtime: Runtime, api: Api = CHAT) -> None:
        self._ref = ref
        self._runtime = runtime  # its observers outlive reloads, as the counters must
        self._api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        flow = _RequestFlow(scope, receive, send, self._api)
        observers = self._runtime.observers
        try:
            await flow.run(self._ref, observers)
        except Exception:
            # A bug, not an upstream's failure: answer in OpenAI's shape if the response has
            # not started, closing the connection (what is left on it is unknown), and raise
            # on for the app to log the traceback.
            error = InternalError("internal proxy error")
            if not flow.record.status:
                flow.record.fail(error.status, error.code, error.message)
            closing = [(b"x-request-id", flow.rid), (b"connection", b"close")]
            with contextlib.suppress(Exception):
                await send_error(send, error, closing)
            raise
        finally:
            flow.record.duration_s = time.perf_counter() - flow.arrived
            observers.finished(flow.record)


class _RequestFlow:
    """One request's way through the pipeline."""

    __slots__ = ("api", "arrived", "opened", "receive", "record", "rid", "scope", "send")

    def __init__(self, scope: Scope, receive: Receive, send: Send, api: Api) -> None:
        self.arrived = time.perf_counter()
        self.scope, self.receive, self.send, self.api = scope, receive, send, api
        self.rid = request_id(scope["headers"])
        self.record = RequestRecord(request_id=self.rid.decode(), api=api.name)
        self.opened = False  # SSE headers sent before an answer existed (keep-alives)

    async def run(self, ref: StateRef, observers: Observers) -> None:
        try:
            state = ref.get()
            limit = state.config.server.max_inflight
            if limit is not None and state.runtime.inflight >= limit:
                raise Overloaded(f"sluicegate is serving its limit of {limit} requests")
        except ProxyError as exc:
            await self._fail(exc, [(b"retry-after", b"1")])
            return
        state.runtime.inflight += 1
        try:
            await self._admitted(state, observers)
        finally:
            state.runtime.inflight -= 1

    async def _admitted(self, state: AppState, observers: Observers) -> None:
        try:
            config = state.config
            key = identify(config, self.scope["headers"])  # before the body: 401 costs nothing
            self.record.key_name = key.name if key is not None else None
            server = config.server
            body = await read_body(
                self.scope, self.receive, server.max_body_bytes, server.body_timeout
            )
            request = parse_request(body, self.api)
            route = config.route(request.model)
            if route is None:
                message = (
                    f"The model '{request.model}' does not exist or you do not have access to it."
                )
                raise ModelNotFound(message, param="model")
            check_model(key, route.model)
            await state.runtime.store.admit(key)
        except ProxyError as exc:
            await self._fail(exc, exc.headers())
            return
        except ClientGone:
            self.record.client_disconnected = True
            self.record.status = 499  # nginx's word for it: the client closed the request
            return
        self.record.route, self.record.stream = route.model, request.stream
        observers.started(route.model)
        watch = ClientWatch(self.receive, state.config.server.finish_after_abort)
        try:
            headers = upstream_request_headers(self.scope["headers"], self.rid)
            run = Attempts(state, route, request, headers, self.record).run()
            keepalive = state.config.server.keepalive_seconds
            if request.stream and keepalive is not None:
                result = await self._with_keepalives(run, keepalive)
            else:
                result = await run
            await self._respond(state, request, result, watch)
        except asyncio.CancelledError:
            if not watch.client_gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # always in a task
            self.record.client_disconnected = True
        finally:
            watch.close()
            self.record.client_disconnected |= watch.client_gone
            if key is not None and self.record.usage is not None:
                used = self.record.usage.prompt + self.record.usage.completion
                await state.runtime.store.charge(key, used, self.record.cost_usd)

    async def _with_keepalives(
        self, run: Coroutine[Any, Any, Answer | Failure], every: float
    ) -> Answer | Failure:
        """While no answer has committed, keep the client's connection alive: after `every`
        seconds the SSE headers go out, then a comment every `every` seconds (the proxy's own
        bytes, never an upstream's). Usually the answer comes first and this costs one timer."""
        pinger: list[asyncio.Task[None]] = []

        def start() -> None:
            pinger.append(asyncio.ensure_future(self._ping(every)))

        timer = asyncio.get_running_loop().call_later(every, start)
        try:
            return await run
        finally:
            timer.cancel()
            for task in pinger:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _ping(self, every: float) -> None:
        while True:
            if not self.opened:
                self.opened = True
                await open_stream(self.send, client_response_headers(SSE_TYPE, self.rid))
            await send_comment(self.send)
            await asyncio.sleep(every)

    async def _respond(
        self, state: AppState, request: ApiRequest, result: Answer | Failure, watch: ClientWatch
    ) -> None:
        record = self.record
        target = result.target
        if target is not None:
            record.upstream, record.model = target.upstream, target.model
        if isinstance(result, Failure):
            watch.done = True
            if self.opened:
                error = result.error or UpstreamProtocolError(
                    f"upstream '{record.upstream}' answered {result.status}"
                )
                record.fail(200, error.code, error.message)
                record.stream_error = "no_answer"
                await end_with_error(self.send, error)
            elif result.error is not None or not result.status:
                await self._fail(result.error or ProxyError("no upstream could answer"))
            else:
                record.status = result.status
                headers = client_response_headers(result.headers, self.rid)
                await send_body(self.send, result.status, result.body, headers)
            return
        first = record.attempts[0] if record.attempts else None
        if first is not None and first.upstream != result.target.upstream:
            record.fallback_reason = first.outcome
        record.status = result.status
        try:
            await self._send_answer(state, request, result, watch)
        finally:
            state.health[result.target.upstream].inflight -= 1

    async def _send_answer(
        self, state: AppState, request: ApiRequest, answer: Answer, watch: ClientWatch
    ) -> None:
        record, upstream = self.record, state.config.upstreams[answer.target.upstream]
        headers = client_response_headers(answer.headers, self.rid)
        if not request.stream:
            watch.done = True
            await send_body(self.send, answer.status, answer.head, headers)
            record.ttft_s = time.perf_counter() - self.arrived
            self._meter(state, answer, usage_of_body(request, answer, upstream))
        else:
            tee = tee_for(request, answer, upstream)
            try:
                relayed = await relay(self.send, answer, headers, watch, tee, opened=self.opened)
                record.ttft_s = relayed.first_byte_at - self.arrived
                if relayed.failure is not None:
                    record.stream_error = relayed.reason
                    record.error, record.message = relayed.failure.code, relayed.failure.message
            finally:  # a client that left cancels the relay: its usage is priced all the same
                self._meter(state, answer, usage_of_stream(request, answer, upstream, tee))

    def _meter(self, state: AppState, answer: Answer, usage: Usage | None) -> None:
        price = state.config.pricing.get(answer.target.model)
        self.record.usage = usage
        self.record.cost_usd = cost_usd(usage, price) if usage is not None else None

    async def _fail(self, exc: ProxyError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.record.fail(exc.status, exc.code, exc.message)
        await send_error(self.send, exc, [(b"x-request-id", self.rid), *(extra or [])])
