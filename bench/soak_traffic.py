"""The soak's traffic: a weighted mix of requests, each knowing what its client must get.

Five routes (see `routes_yaml`): `soak-fallback` (the faulty upstream, then a healthy backup),
`soak-solo` (the faulty upstream alone), `soak-broken` (a listener that resets every
connection, a closed port, then the backup), `soak-broken-solo` (the resetter alone) and
`soak-hedged` (the faulty upstream, with the backup started beside it after 0.2 s).
Answers are the mock's deterministic bytes for the request's seed and token count, so every
answer is checked byte for byte; a fault that moves on must end in the backup's answer, a
fault that cannot must end in an explicit error: the upstream's own error answer as it was,
the proxy's 502/504 in OpenAI's shape, or, once the stream has begun, a last SSE error event.
Anything else (a wrong byte, a silent truncation, no answer within `HUNG` seconds) is lost.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy.mock.content import (
    completion_body,
    count_prompt_tokens,
    expected_content,
    injected_error_body,
    stream_events,
)

HUNG = 30.0  # seconds without a complete answer: the request is lost
FAULTY, BACKUP = "faulty-model", "backup-model"  # the upstream model names; the mock echoes them
EITHER = (FAULTY, BACKUP)
KEEPALIVE = b": keep-alive\n\n"
PROMPTS = ("hi", "双十一预售什么时候开始?", "Is my 🛒 still saved?", "café, s'il vous plaît")
JSON_HEADERS = {"content-type": "application/json"}


def routes_yaml(faulty: int, backup: int, resetter: int, closed: int) -> str:
    """The proxy's config for the soak's upstream ports (closed: a port nothing listens on).

    Cooldowns: about a quarter of `soak-fallback`'s requests fail on `faulty`, so five failures
    in a row happen now and then; its circuit opens for a second and the half-open probe runs
    under load without keeping the faults out of the mix (the default, 3 failures and 30 s,
    would keep `faulty` out most of the time; `faulty-hedged` likewise). `resetter` and
    `closed` always fail: one probe a second each. `faulty-solo` and `faulty-hedged` are the
    same upstream under other names, so the Retry-After and the cooldown that `soak-solo`'s
    errors earn there do not steer the other routes."""
    t = "timeouts: {connect: 2, read: 10, idle: 5}"
    brief, flaky = "cooldown: {failures: 5, seconds: 1}", "cooldown: {failures: 3, seconds: 1}"
    return f"""\
upstreams:
  faulty: {{base_url: 'http://127.0.0.1:{faulty}/v1', {t}, {brief}}}
  faulty-solo: {{base_url: 'http://127.0.0.1:{faulty}/v1', {t}}}
  faulty-hedged: {{base_url: 'http://127.0.0.1:{faulty}/v1', {t}, {brief}}}
  backup: {{base_url: 'http://127.0.0.1:{backup}/v1', {t}}}
  resetter: {{base_url: 'http://127.0.0.1:{resetter}/v1', {t}, {flaky}}}
  closed: {{base_url: 'http://127.0.0.1:{closed}/v1', {t}, {flaky}}}
routes:
  - model: soak-fallback
    targets: [{{upstream: faulty, model: {FAULTY}, first_token_timeout: 1.0}}]
    fallbacks: [{{upstream: backup, model: {BACKUP}}}]
    retries: 1
  - model: soak-solo
    targets: [{{upstream: faulty-solo, model: {FAULTY}}}]
    retries: 1
  - model: soak-broken
    targets: [{{upstream: resetter, model: reset-model}}]
    fallbacks: [{{upstream: closed, model: closed-model}}, {{upstream: backup, model: {BACKUP}}}]
  - model: soak-broken-solo
    targets: [{{upstream: resetter, model: reset-model}}]
    retries: 1
  - model: soak-hedged
    targets: [{{upstream: faulty-hedged, model: {FAULTY}}}]
    fallbacks: [{{upstream: backup, model: {BACKUP}}}]
    hedge_after: 0.2
    retries: 1
pricing:
  {FAULTY}: {{input: 0.28, cached_input: 0.028, output: 0.42}}
  {BACKUP}: {{input: 0.1, output: 0.4}}
"""


# --- what the client must get ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """200 and the mock's exact answer from one of `models`."""

    models: tuple[str, ...] = EITHER
    keepalives: int = 0  # the faulty upstream's comments, relayed before its answer
    text_only: bool = False  # a JSON answer the proxy turned into SSE: check the text


@dataclass(frozen=True)
class Cut:
    """200, the faulty upstream's first `events` content events, then one SSE error event."""

    events: int
    code: str
    or_backup: bool = False  # a route with a fallback may have moved on before a slow start


@dataclass(frozen=True)
class Relayed:
    """The faulty upstream's own error answer, status, body and Retry-After as they were."""

    status: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Refused:
    """The proxy's own error, in OpenAI's shape."""

    status: int
    code: str


@dataclass(frozen=True)
class Abort:
    """The client leaves after `events` content events: what it got begins the answer."""

    events: int


@dataclass(frozen=True)
class GiveUp:
    """The client leaves after `seconds`, before any answer could arrive."""

    seconds: float


Expect = Answer | Cut | Relayed | Refused | Abort | GiveUp


@dataclass(frozen=True)
class Case:
    name: str
    route: str
    stream: bool
    expect: Expect
    weight: int
    fault: dict[str, Any] = field(default_factory=dict)  # knobs only the faulty upstream obeys
    tokens: tuple[int, int] = (1, 48)
    delay: float = 0.004
    include_usage: bool = False


A, B, C, D, E = "soak-fallback", "soak-solo", "soak-broken", "soak-broken-solo", "soak-hedged"
TO_BACKUP = Answer((BACKUP,))
PROTOCOL = "upstream_protocol_error"
SLOW_START = {"ttft": 3.0}  # past the fallback route's first_token_timeout of 1 s

# fmt: off
CASES = (
    Case("stream", A, True, Answer(), 22),
    Case("stream_with_usage", A, True, Answer(), 6, include_usage=True),
    Case("plain", A, False, Answer(), 10),
    Case("long_stream", A, True, Answer(), 2, tokens=(1500, 3000), delay=0.0),
    Case("split_utf8", A, True, Answer(), 3, {"split_utf8": True}),
    Case("keepalives_then_answer", A, True, Answer(EITHER, 3), 3, {"keepalives": 3, "ttft": 0.1}),
    Case("json_for_stream", A, True, Answer(text_only=True), 2, {"json_for_stream": True}),
    Case("fallback_on_500", A, True, TO_BACKUP, 3, {"status": 500}),
    Case("fallback_on_503", A, False, TO_BACKUP, 2, {"status": 503}),
    Case("fallback_on_429", A, True, TO_BACKUP, 2, {"status": 429}),
    Case("fallback_on_reset_before_content", A, True, TO_BACKUP, 2, {"reset_after": 0}),
    Case("fallback_on_slow_first_token", A, True, TO_BACKUP, 2, SLOW_START),
    Case("fallback_on_keepalive_flood", A, True, TO_BACKUP, 1, {"keepalives": 10, "ttft": 3.0}),
    Case("fallback_on_slow_headers", A, False, TO_BACKUP, 1, SLOW_START),
    Case("cut_by_reset", A, True, Cut(2, PROTOCOL, or_backup=True), 2, {"reset_after": 2},
         tokens=(4, 40)),
    Case("client_abort", A, True, Abort(3), 3, tokens=(200, 400), delay=0.01),
    Case("client_gives_up_during_keepalives", A, True, GiveUp(0.5), 1,
         {"keepalives": 10, "ttft": 3.0}),
    Case("solo_stream", B, True, Answer((FAULTY,)), 8),
    Case("solo_plain", B, False, Answer((FAULTY,)), 4),
    Case("relay_500", B, True, Relayed(500), 2, {"status": 500}),
    Case("relay_503", B, False, Relayed(503), 2, {"status": 503}),
    Case("relay_429_retry_after", B, False, Relayed(429, "1"), 1,
         {"status": 429, "retry_after": 1}),
    Case("refuse_reset_before_content", B, True, Refused(502, PROTOCOL), 2, {"reset_after": 0}),
    Case("cut_by_reset_solo", B, True, Cut(3, PROTOCOL), 2, {"reset_after": 3}, tokens=(5, 40)),
    Case("cut_by_idle", B, True, Cut(1, "upstream_timeout"), 1, {"pause_after_first": 7.0},
         tokens=(3, 10)),
    Case("client_gives_up", B, True, GiveUp(0.3), 2, {"ttft": 5.0}),
    Case("reset_before_headers_fallback", C, True, TO_BACKUP, 3),
    Case("reset_before_headers_fallback_plain", C, False, TO_BACKUP, 1),
    Case("reset_before_headers", D, True, Refused(502, PROTOCOL), 1),
    Case("reset_before_headers_plain", D, False, Refused(502, PROTOCOL), 1),
    Case("hedged_stream", E, True, Answer(), 3),
    Case("hedge_beats_slow_start", E, True, TO_BACKUP, 2, SLOW_START),
    Case("hedged_plain_on_500", E, False, TO_BACKUP, 1, {"status": 500}),
)
# fmt: on


# --- one request -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    case: Case
    seed: int
    tokens: int
    messages: list[dict[str, str]]

    @classmethod
    def draw(cls, case: Case, rng: random.Random) -> Request:
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        return cls(case, rng.randrange(1 << 30), rng.randint(*case.tokens), messages)

    def body(self) -> bytes:
        c = self.case
        body: dict[str, Any] = {
            "model": c.route,
            "messages": self.messages,
            "stream": c.stream,
            "seed": self.seed,
            "mock": {"tokens": self.tokens, "delay": c.delay, "ttft": 0.02},
        }
        if c.fault:
            body["fault"] = c.fault
        if c.include_usage:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    def answer(self, model: str) -> bytes:
        """The exact body the client gets when `model`'s upstream answers whole.

        Upstreams are `stream_options: auto`: the proxy asks each for usage, so every chunk
        carries `"usage":null`, and it drops the usage event unless the client asked for it."""
        prompt = count_prompt_tokens(self.messages)
        if not self.case.stream:
            return completion_body(self.seed, model, self.tokens, "stop", prompt)
        events = stream_events(self.seed, model, self.tokens, "stop", True)
        usage = events.usage_event(prompt, self.tokens) if self.case.include_usage else b""
        return events.role + b"".join(events.content) + events.final + usage + events.done

    def cut(self, events: int) -> bytes:
        """The faulty upstream's stream up to its `events`th content event."""
        ev = stream_events(self.seed, FAULTY, self.tokens, "stop", True)
        return ev.role + b"".join(ev.content[:events])


@dataclass(slots=True)
class Got:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # False: the client left on purpose before the end


def check(request: Request, got: Got) -> tuple[str, str | None]:
    """(the outcome's kind, None) when the client got what it must; ("lost", why) if not."""
    try:
        kind, problem = _check(request, got)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        kind, problem = "unreadable", f"{exc!r} in {got.body[:200]!r}"
    return (kind, None) if problem is None else ("lost", f"{kind}: {problem}")


def _check(request: Request, got: Got) -> tuple[str, str | None]:
    expect = request.case.expect
    if isinstance(expect, Answer | GiveUp):  # a give-up whose answer came first: an answer
        answer = expect if isinstance(expect, Answer) else Answer()
        return "answered", _answer_problem(request, answer, got)
    if isinstance(expect, Abort):
        if got.complete:  # the answer ended before the client meant to leave
            return "answered", _answer_problem(request, Answer(), got)
        return "aborted", _abort_problem(request, got)
    if isinstance(expect, Cut):
        if expect.or_backup and BACKUP.encode() in got.body[:300]:
            return "answered", _answer_problem(request, TO_BACKUP, got)
        return "cut", _cut_problem(request, expect, got)
    return "error", _error_problem(expect, got)


def _error_problem(expect: Relayed | Refused, got: Got) -> str | None:
    if isinstance(expect, Relayed):
        wanted = (expect.status, injected_error_body(expect.status), expect.retry_after)
        if (got.status, got.body, got.headers.get("retry-after")) == wanted:
            return None
        return f"wanted the upstream's {expect.status}, got {got.status} {got.body[:200]!r}"
    if got.status == expect.status and _openai_error(got.body) == expect.code:
        return None
    return f"wanted {expect.status} {expect.code}, got {got.status} {got.body[:200]!r}"


def _abort_problem(request: Request, got: Got) -> str | None:
    whole = [request.answer(model) for model in EITHER]
    if got.status == 200 and any(w.startswith(got.body) for w in whole):
        return None
    return f"status {got.status}, not how the answer begins: {got.body[-200:]!r}"


def _answer_problem(request: Request, expect: Answer, got: Got) -> str | None:
    if got.status != 200:
        return f"status {got.status}: {got.body[:200]!r}"
    if expect.text_only:
        return _text_problem(request, got.body)
    wanted = [
        (KEEPALIVE * expect.keepalives if model == FAULTY else b"") + request.answer(model)
        for model in expect.models
    ]
    if got.body in wanted:
        return None
    same = max(_common_prefix(got.body, w) for w in wanted)
    return (
        f"{len(got.body)} bytes, the answer has {len(wanted[0])}; they differ from byte "
        f"{same}: {got.body[max(0, same - 40) : same + 80]!r}"
    )


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _text_problem(request: Request, body: bytes) -> str | None:
    events = [e for e in body.split(b"\n\n") if e]
    if events[-1:] != [b"data: [DONE]"] or events.count(b"data: [DONE]") != 1:
        return f"no single [DONE] at the end: ...{body[-200:]!r}"
    text = ""
    for event in events[:-1]:
        chunk = orjson.loads(event.removeprefix(b"data: "))
        text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    want = expected_content(request.seed, request.tokens)
    return None if text == want else f"text {text[:80]!r} is not {want[:80]!r}"


def _cut_problem(request: Request, expect: Cut, got: Got) -> str | None:
    head = request.cut(expect.events)
    if got.status != 200 or not got.body.startswith(head):
        return f"status {got.status}, not the stream's first events: {got.body[:200]!r}"
    rest = got.body[len(head) :]
    if not (rest.startswith(b"data: ") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1):
        return f"not one error event after the cut: {rest[:200]!r}"
    code = _openai_error(rest[6:-2])
    return None if code == expect.code else f"error event {rest[:200]!r}, wanted {expect.code}"


def _openai_error(payload: bytes) -> str | None:
    """The `code` of an OpenAI-shaped error body; None when it is not one."""
    try:
        error = orjson.loads(payload)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return None
    return error["code"] if error["message"] else None


async def fetch(session: aiohttp.ClientSession, url: str, request: Request) -> Got:
    """Send one request and read its answer (or leave when the case says so)."""
    expect = request.case.expect
    async with session.post(url, data=request.body(), headers=JSON_HEADERS) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        if not isinstance(expect, Abort):
            return Got(response.status, headers, await response.read(), True)
        got = bytearray()
        async for chunk in response.content.iter_any():
            got += chunk
            complete = got[: got.rfind(b"\n\n") + 1]
            if complete.count(b'"delta":{"content":') >= expect.events:
                response.close()  # drop the connection mid-stream
                return Got(response.status, headers, bytes(got), False)
        return Got(response.status, headers, bytes(got), True)


async def run_one(
    session: aiohttp.ClientSession, url: str, request: Request
) -> tuple[str, str | None]:
    """The outcome of one request: its kind, and why it counts as lost (None if it does not)."""
    expect = request.case.expect
    try:
        async with asyncio.timeout(HUNG):
            if isinstance(expect, GiveUp):
                try:
                    async with asyncio.timeout(expect.seconds):
                        got = await fetch(session, url, request)
                except TimeoutError:
                    return "gave_up", None
            else:
                got = await fetch(session, url, request)
    except TimeoutError:
        return "lost", f"no complete answer within {HUNG:g} s"
    except (aiohttp.ClientError, OSError) as exc:  # a cut connection, a truncated chunked body
        return "lost", f"{type(exc).__name__}: {exc}"
    return check(request, got)
