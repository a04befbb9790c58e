"""An OpenAI-compatible fake upstream: a raw ASGI app with knobs for every misbehaviour the
proxy must survive (slow first token, keep-alive comments, stalls, resets, split UTF-8, CRLF
framing, errors), each set per request (`proxy.mock.knobs`). Answers are deterministic per
`seed`, so a direct and a proxied body can be compared byte for byte."""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

from proxy.errors import error_body
from proxy.mock.asgi import (
    JSON_TYPE,
    KEEPALIVE,
    Headers,
    lifespan,
    open_stream,
    respond,
    send_piece,
)
from proxy.mock.chat import ChatEvents, ChatPlan, plan_chat, wants_shapes
from proxy.mock.content import (
    COOKIE_HEADERS,
    CREATED,
    HOSTILE_HEADERS,
    MODELS,
    NEWLINES,
    Invalid,
    Plan,
    StreamEvents,
    completion_body,
    count_prompt_tokens,
    cut_mid_event,
    echo_headers,
    embeddings_body,
    encoded,
    expected_content,
    frame,
    injected_error_body,
    plan_request,
    preamble_writes,
    split_event,
    stream_events,
    text_completion_body,
    text_stream_events,
)
from proxy.mock.knobs import DEFAULTS, MOCK, MOCK_AND_FAULT, Knobs, knobs_for
from proxy.mock.replay import Recording, load
from proxy.mock.responses import ResponsePlan, ResponsesEvents, StoredResponses, plan_response
from proxy.serving import RunningServer, fastest_http, fastest_loop

__all__ = [
    "Knobs",
    "MockReset",
    "MockUpstream",
    "RequestRecord",
    "RunningServer",
    "count_prompt_tokens",
    "expected_content",
    "serve",
]


@dataclass
class RequestRecord:
    headers: dict[str, str]
    body: dict[str, Any]
    started: float
    finished: float | None = None
    disconnected: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sent_tokens: int = 0  # content events actually written (fewer on reset or disconnect)
    peer: tuple[str, int] | None = None  # the client's address: which connection carried it
    target: str = ""  # the path and query it was sent to


class MockReset(Exception):
    """Raised out of the app on purpose so uvicorn drops the connection mid-body."""


class _HideResets(logging.Filter):
    # uvicorn logs every exception escaping an app; a reset we asked for is not an error.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], MockReset))


logging.getLogger("uvicorn.error").addFilter(_HideResets())


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "sluicegate-mock"}
            for m in MODELS
        ],
    }
)
_HEALTH_BODY = b'{"status":"ok"}'
# By the end of the path: any prefix serves (Azure's /openai/deployments/NAME/...).
_APIS = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/responses": "responses",
}


class MockUpstream:
    """The ASGI app. Holds server-wide default Knobs and records every chat request.

    `faults`: also obey the body's `"fault"` knobs (see proxy/mock/knobs.py). `keep_records`:
    keep about the latest N records only (between N and 2N), for runs of millions of requests.
    `replay_dir`: where knob `replay` finds its recordings (see proxy/mock/replay.py).
    """

    def __init__(
        self,
        defaults: Knobs = DEFAULTS,
        *,
        faults: bool = False,
        keep_records: int | None = None,
        replay_dir: Path | None = None,
    ) -> None:
        self.defaults = defaults
        self.replay_dir = replay_dir
        self.fields = MOCK_AND_FAULT if faults else MOCK
        self.keep_records = keep_records
        self.records: list[RequestRecord] = []
        self.stored = StoredResponses()  # what /v1/responses answered, for retrieval

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        api = next((name for end, name in _APIS.items() if path.endswith(end)), None)
        if method == "POST" and api is not None:
            await self._generate(scope, receive, send, api)
        elif path.startswith("/v1/responses/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            await respond(send, *self.stored.answer(method, path, auth))
        elif method == "GET" and path == "/v1/models":
            await respond(send, 200, _MODELS_BODY)
        elif method == "GET" and path == "/healthz":
            await respond(send, 200, _HEALTH_BODY)
        else:
            msg = f"Unknown request URL: {method} {path}"
            await respond(send, 404, error_body(msg, "invalid_request_error", code="not_found"))

    async def _generate(self, scope: Scope, receive: Receive, send: Send, api: str) -> None:
        started = time.monotonic()
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            msg = "We could not parse the JSON body of your request."
            await respond(send, 400, error_body(msg, "invalid_request_error"))
            return
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        query = scope["query_string"].decode()
        target = scope["path"] + ("?" + query if query else "")
        record = RequestRecord(headers, body, started, peer=scope.get("client"), target=target)
        self._record(record)
        try:
            knobs = knobs_for(self.defaults, body, headers, self.fields)
            if knobs.status is not None:
                # Injected errors answer at once, as an overloaded or rate-limiting upstream does.
                retry = knobs.retry_after
                extra = [] if retry is None else [(b"retry-after", f"{retry:g}".encode())]
                key = headers.get("authorization") or headers.get("api-key", "")  # Azure's
                echo = key if knobs.echo_auth else None
                extra += [*echo_headers(echo), *_cdn_headers(knobs)]
                record.finished = time.monotonic()
                error = injected_error_body(knobs.status, echo, knobs.echo_form)
                error, encoding = encoded(error, knobs.encoding)
                await respond(send, knobs.status, error, extra + encoding)
                return
            if knobs.reject_stream_options and "stream_options" in body:
                raise Invalid("Unknown parameter: stream_options", "stream_options")
            plan = self._plan(body, knobs, api)
            replay = (
                None if knobs.replay is None else load(self.replay_dir, knobs.replay, plan.stream)
            )
        except Invalid as exc:
            record.finished = time.monotonic()
            await respond(send, 400, exc.body())
            return
        if replay is not None:
            await _guarded(record, receive, _replay(send, knobs, replay, record))
            return
        record.prompt_tokens, record.completion_tokens = plan.prompt_tokens, plan.tokens
        if isinstance(plan, ResponsePlan | ChatPlan):
            record.completion_tokens = plan.output_tokens()
        await _guarded(record, receive, _answer(send, knobs, plan, record))

    def _plan(self, body: dict[str, Any], knobs: Knobs, api: str) -> Plan:
        if api != "responses":
            plan = plan_request(body, 0 if api == "embeddings" else knobs.tokens, api)
            return (
                plan_chat(plan, body, knobs)
                if api == "chat" and wants_shapes(body, knobs)
                else plan
            )
        previous = body.get("previous_response_id")
        if previous is not None and not self.stored.knows(previous):
            message = f"Previous response with id '{previous}' not found."
            raise Invalid(message, "previous_response_id")
        plan = plan_response(body, knobs)
        self.stored.keep(plan)
        return plan

    def _record(self, record: RequestRecord) -> None:
        self.records.append(record)
        keep = self.keep_records
        if keep is not None and len(self.records) > 2 * keep:
            del self.records[:-keep]


async def _guarded(record: RequestRecord, receive: Receive, answer: typing.Awaitable[None]) -> None:
    # Race every sleep against the client going away: uvicorn's `send` goes quiet after a
    # disconnect, so only `receive()` tells. The watcher cancels this task; cancelling (rather
    # than racing each sleep against an event) keeps the per-token path free of extra work.
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if record.finished is None:  # uvicorn also reports a completed response as a disconnect
            record.disconnected = time.monotonic()
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await answer
    except asyncio.CancelledError:
        # Swallow only our own cancellation, not a server shutdown's.
        if record.disconnected is None or task.uncancel() > 0:
            raise
    finally:
        watcher.cancel()


async def _answer(send: Send, knobs: Knobs, plan: Plan, record: RequestRecord) -> None:
    extra: Headers = []
    if knobs.usage_headers:
        extra = [
            (b"x-prompt-tokens", b"%d" % plan.prompt_tokens),
            (b"x-completion-tokens", b"%d" % plan.tokens),
        ]
    extra += _cdn_headers(knobs)
    if plan.stream and not knobs.json_for_stream:
        await _stream(send, knobs, plan, record, extra)
        return
    await asyncio.sleep(knobs.ttft + plan.tokens * knobs.delay)
    body, encoding = encoded(_body(plan), knobs.encoding)
    headers = [JSON_TYPE, (b"content-length", b"%d" % len(body)), *extra, *encoding]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if knobs.stall:
        await asyncio.sleep(knobs.stall)
    record.sent_tokens = plan.tokens
    record.finished = time.monotonic()
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _cdn_headers(knobs: Knobs) -> Headers:
    """What knobs `set_cookie` and `hostile_headers` add to every answer."""
    return [
        *(COOKIE_HEADERS if knobs.set_cookie else ()),
        *(HOSTILE_HEADERS if knobs.hostile_headers else ()),
    ]


def _body(plan: Plan) -> bytes:
    if isinstance(plan, ResponsePlan):
        return orjson.dumps(plan.finished())
    if isinstance(plan, ChatPlan):
        return plan.body_bytes()
    if plan.api == "embeddings":
        return embeddings_body(plan.seed, plan.model, plan.inputs, plan.prompt_tokens)
    shape = text_completion_body if plan.api == "completions" else completion_body
    return shape(plan.seed, plan.model, plan.tokens, plan.finish, plan.prompt_tokens)


async def _stream(
    send: Send, knobs: Knobs, plan: Plan, record: RequestRecord, extra: Headers
) -> None:
    shape = text_stream_events if plan.api == "completions" else stream_events
    events: StreamEvents | ResponsesEvents | ChatEvents = (
        plan.events()
        if isinstance(plan, ResponsePlan | ChatPlan)
        else shape(plan.seed, plan.model, plan.tokens, plan.finish, plan.include_usage)
    )
    split, newline = knobs.split_utf8, NEWLINES[knobs.newline]

    async def write(event: bytes, more: bool = True) -> None:
        if not event and more:  # the completions API has no role event, responses no [DONE]
            return
        event = frame(event, newline)
        if split:
            *head, event = split_event(event)
            for piece in head:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(knobs.split_pause)
        await send({"type": "http.response.body", "body": event, "more_body": more})

    await open_stream(send, knobs, _SSE_HEADERS + extra, lambda: write(KEEPALIVE))
    for piece in preamble_writes(knobs.preamble, knobs.preamble_as) if knobs.preamble else ():
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    if knobs.preamble:  # a client gone during it is seen before any token counts as sent: its
        for _ in range(3):  # close, the watcher's wake-up and the cancel take a loop round each
            await asyncio.sleep(0)
    reset = -1 if knobs.reset_after is None else knobs.reset_after
    await write(events.role)
    for i, event in enumerate(events.content):
        if i and knobs.delay:
            await asyncio.sleep(knobs.delay)
        if i == reset:
            if knobs.reset_mid_event:
                await write(cut_mid_event(event))
            break
        await write(event)
        record.sent_tokens = i + 1
        if i == 0 and knobs.pause_after_first:
            await asyncio.sleep(knobs.pause_after_first)
    if record.sent_tokens == reset:
        record.finished = time.monotonic()
        raise MockReset(f"mock reset after {reset} content events")

    await write(events.final)
    if plan.include_usage:
        await write(events.usage_event(plan.prompt_tokens, plan.tokens))
    record.finished = time.monotonic()
    await write(events.done, more=False)


async def _replay(send: Send, knobs: Knobs, recording: Recording, record: RequestRecord) -> None:
    """A recording's bytes as they are, one write per event, `delay` apart (knob `replay`)."""
    headers = [(b"content-type", recording.content_type), (b"cache-control", b"no-cache")]
    if recording.content_type == JSON_TYPE[1]:
        headers[1] = (b"content-length", b"%d" % len(recording.payload))
    await open_stream(send, knobs, headers, lambda: send_piece(send, KEEPALIVE, True))
    last = len(recording.pieces) - 1
    for i, piece in enumerate(recording.pieces):
        if i and knobs.delay:
            await asyncio.sleep(knobs.delay)
        if i == knobs.replay_pause_at:
            await asyncio.sleep(knobs.pause_after_first)
        if i == last:
            record.finished = time.monotonic()
        await send_piece(send, piece, i < last)


def serve(host: str = "127.0.0.1", port: int = 8900, defaults: Knobs = DEFAULTS) -> None:
    """Run the mock upstream in the foreground until interrupted."""
    uvicorn.run(
        MockUpstream(defaults),
        host=host,
        port=port,
        loop=fastest_loop(),
        http=fastest_http(),
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="sluicegate's OpenAI-compatible mock upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    args = parser.parse_args()
    serve(args.host, args.port)
