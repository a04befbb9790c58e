"""POST /v1/chat/completions (and /v1/completions, /v1/embeddings): admission → route choice →
attempts → relay → metering."""

from __future__ import annotations

import asyncio
import contextlib
import time

from proxy.admission import check_model, identify
from proxy.answer import Answer, Failure
from proxy.api_request import CHAT, RESPONSES, Api, ApiRequest, parse_request
from proxy.asgi import ClientGone, ClientWatch, Receive, Scope, Send, read_body, send_error
from proxy.attempts import Attempts
from proxy.config import ClientKey
from proxy.errors import (
    NO_RETRY,
    InternalError,
    Overloaded,
    ProxyError,
    UpstreamProtocolError,
    unknown_model,
)
from proxy.exchange import client_body, client_tee, translated
from proxy.headers import Headers, client_response_headers, request_id, upstream_request_headers
from proxy.metering.cost import cost_usd
from proxy.metering.usage import usage_of_body, usage_of_stream
from proxy.origin import check_api_request
from proxy.record import Observers, RequestRecord, Usage
from proxy.relay import Reply
from proxy.retrieval import learn, pinned
from proxy.state import AppState, Runtime, StateRef

RETRY_SOON: Headers = [(b"retry-after", b"1")]


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

    __slots__ = ("api", "arrived", "receive", "record", "rid", "scope", "send")

    def __init__(self, scope: Scope, receive: Receive, send: Send, api: Api) -> None:
        self.arrived = time.perf_counter()
        self.scope, self.receive, self.send, self.api = scope, receive, send, api
        self.rid = request_id(scope["headers"])
        self.record = RequestRecord(request_id=self.rid.decode(), api=api.name)

    async def run(self, ref: StateRef, observers: Observers) -> None:
        try:
            state = ref.get()
        except ProxyError as exc:
            await self._fail(exc, RETRY_SOON)
            return
        arrived = await self._arrive(state)
        if arrived is None:
            return
        # Counted only now: a body still on its way holds no slot (`body_timeout` and the
        # connection cap bound those), so clients trickling bytes cannot refuse everyone.
        limit = state.config.server.max_inflight
        if limit is not None and state.runtime.inflight >= limit:
            await self._fail(
                Overloaded(f"sluicegate is serving its limit of {limit} requests"), RETRY_SOON
            )
            return
        state.runtime.inflight += 1
        try:
            await self._admitted(state, *arrived, observers)
        finally:
            state.runtime.inflight -= 1

    async def _arrive(self, state: AppState) -> tuple[ClientKey | None, bytes] | None:
        """The caller's key and the whole body; None when answered (or the client left)."""
        try:
            key = identify(state.config, self.scope["headers"])  # before the body: 401 is free
            self.record.key_name = key.name if key is not None else None
            config, server = state.config, state.config.server
            check_api_request(self.scope["headers"], server, open_proxy=not config.keys)
            body = await read_body(
                self.scope, self.receive, server.max_body_bytes, server.body_timeout
            )
        except ProxyError as exc:
            await self._fail(exc)
            return None
        except ClientGone:
            self.record.client_disconnected = True
            self.record.status = 499  # nginx's word for it: the client closed the request
            return None
        return key, body

    async def _admitted(
        self, state: AppState, key: ClientKey | None, body: bytes, observers: Observers
    ) -> None:
        try:
            config = state.config
            request = parse_request(body, self.api)
            route = config.route(request.model)
            if route is None:
                raise unknown_model(request.model, config.server.max_echoed_chars)
            check_model(key, route.model)
            await state.runtime.store.admit(key)
            if request.api is RESPONSES:  # a `previous_response_id` lives on one upstream
                route = await pinned(route, request, state.runtime.owners)
        except ProxyError as exc:
            await self._fail(exc)
            return
        self.record.route, self.record.stream = route.model, request.stream
        observers.started(route.model)
        watch = ClientWatch(self.receive, state.config.server.finish_after_abort)
        reply = Reply(self.send, watch, responses=request.api is RESPONSES)
        result: Answer | Failure | None = None
        try:
            headers = upstream_request_headers(self.scope["headers"], self.rid)
            every = state.config.server.keepalive_seconds if request.stream else None
            async with reply.keepalives(every, self.rid):
                result = await Attempts(state, route, request, headers, self.record).run()
            await self._respond(state, request, result, reply)
        except asyncio.CancelledError:
            if not watch.client_gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # always in a task
            self.record.client_disconnected = True
        finally:
            if isinstance(result, Answer):  # sent, cut short, or never sent (the client left)
                await result.aclose()
            watch.close()
            self.record.client_disconnected |= watch.client_gone
            if key is not None and self.record.usage is not None:
                used = self.record.usage.prompt + self.record.usage.completion
                await state.runtime.store.charge(key, used, self.record.cost_usd)

    async def _respond(
        self, state: AppState, request: ApiRequest, result: Answer | Failure, reply: Reply
    ) -> None:
        record = self.record
        target = result.target
        if target is not None:
            record.upstream, record.model = target.upstream, target.model
        if isinstance(result, Failure):
            await self._refuse(result, reply)
            return
        first = record.attempts[0] if record.attempts else None
        if first is not None and first.upstream != result.target.upstream:
            record.fallback_reason = first.outcome
        record.status = result.status
        await self._send_answer(state, request, result, reply)

    async def _refuse(self, failure: Failure, reply: Reply) -> None:
        """No answer committed: the error, in the form the response can still take."""
        record = self.record
        if reply.opened:
            error = failure.error or UpstreamProtocolError(
                f"upstream '{record.upstream}' answered {failure.status}"
            )
            record.fail(200, error.code, error.message)
            record.stream_error = "no_answer"
            await reply.error_event(error)
            return
        advice: Headers = [] if failure.may_retry else [NO_RETRY]
        if failure.error is not None or not failure.status:
            error = failure.error or ProxyError("no upstream could answer")
            await self._fail(error, advice, reply=reply)
        else:
            record.status = failure.status
            headers = client_response_headers(failure.headers, self.rid)
            if advice:  # replaces the upstream's own advice, which knew nothing of our retries
                headers = [(k, v) for k, v in headers if k != b"x-should-retry"] + advice
                record.should_retry = False
            await reply.whole(failure.status, failure.body, headers)

    async def _send_answer(
        self, state: AppState, request: ApiRequest, answer: Answer, reply: Reply
    ) -> None:
        record, upstream = self.record, state.config.upstreams[answer.target.upstream]
        headers = client_response_headers(answer.headers, self.rid)
        if request.api is RESPONSES and record.route and not translated(request, upstream):
            learn(state, answer, record.route, record.key_name)  # for retrieval
        if not request.stream:
            answer.head = client_body(request, answer, upstream)  # metered as the client has it
            await reply.whole(answer.status, answer.head, headers)
            record.ttft_s = time.perf_counter() - self.arrived
            self._meter(state, answer, usage_of_body(request, answer, upstream))
        else:
            tee = client_tee(request, answer, upstream)
            try:
                relayed = await reply.relay(answer, headers, tee)
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

    async def _fail(
        self, exc: ProxyError, extra: Headers | None = None, *, reply: Reply | None = None
    ) -> None:
        """The proxy's own error, with its own headers (`exc.headers()`) and `extra`; through
        the `reply` once the request was admitted."""
        self.record.fail(exc.status, exc.code, exc.message)
        headers = [(b"x-request-id", self.rid), *exc.headers(), *(extra or [])]
        if NO_RETRY in headers:
            self.record.should_retry = False
        if reply is None:
            await send_error(self.send, exc, headers)
        else:
            await reply.error(exc, headers)
