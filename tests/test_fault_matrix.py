"""Every upstream fault, streamed and not, alone and with a fallback: what the client gets, what
/metrics counts for it, and that the proxy serves the next request. tests/README.md shows the
table (checked against this file).

One proxy serves every cell; each cell has its own route and upstream names, so its health,
retry budget and metric series are its own. Routes allow one retry, so a failure that moves on
is attempted twice when alone, and once (then the fallback's answer) with a fallback.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.mock.content import completion_body, injected_error_body, stream_events
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import wait_for

SEED = 7
MESSAGES = [{"role": "user", "content": "双十一还有货吗?"}]
ANSWER = expected_content(SEED, 16)
LONG = "长" * 350_000  # one content delta of ~1 MB of UTF-8
TIMEOUTS = {"connect": 0.5, "read": 0.5, "idle": 0.5}


def fast(**knobs: Any) -> Knobs:
    """A mock that answers at once, where pacing is not the fault under test."""
    return Knobs(**{"ttft": 0.0, "delay": 0.0, **knobs})


# --- a raw upstream, for what the mock cannot do ----------------------------------------------

Script = Callable[[socket.socket, bool], None]


class RawUpstream(socketserver.ThreadingTCPServer):
    """A loopback TCP server that reads each request and answers it with a script."""

    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), _RawHandler)
        self.script, self.url = script, f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _RawHandler(socketserver.StreamRequestHandler):
    server: RawUpstream

    def handle(self) -> None:
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line[15:])
        stream = orjson.loads(self.rfile.read(length)).get("stream") is True
        self.server.script(self.connection, stream)


def _response(content_type: bytes, *chunks: bytes, length: bool = False, end: bool = True) -> bytes:
    framing = b"content-length: %d" % len(chunks[0]) if length else b"transfer-encoding: chunked"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n%s\r\n\r\n" % (content_type, framing)
    if length:
        return head + chunks[0]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return head + body + (b"0\r\n\r\n" if end else b"")


SSE, JSON = b"text/event-stream", b"application/json"
RESPONSES = "responses"
EVENTS = stream_events(SEED, "raw", 16, "stop", False)
COMPLETION = completion_body(SEED, "raw", 16, "stop", 10)
GARBAGE = b"hello\n\nevent: ping\n\ndata: {not json\n\n\xff\xfe\x00\n\ndata: 42\n\n"


def _reset(conn: socket.socket, stream: bool) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # linger 0: an RST, not a FIN


def _truncated(conn: socket.socket, stream: bool) -> None:
    part = EVENTS.role + EVENTS.content[0][:30] if stream else COMPLETION[:50]
    conn.sendall(_response(SSE if stream else JSON, part, end=False))


def _no_answer(conn: socket.socket, stream: bool) -> None:
    page = b"<html><body>Service Temporarily Unavailable</body></html>"
    conn.sendall(_response(SSE, GARBAGE) if stream else _response(b"text/html", page, length=True))


def _garbage_then_answer(conn: socket.socket, stream: bool) -> None:
    events = (GARBAGE, EVENTS.role, *EVENTS.content, EVENTS.final, EVENTS.done)
    conn.sendall(_response(SSE, *events) if stream else _response(JSON, COMPLETION, length=True))


def _one_megabyte_event(conn: socket.socket, stream: bool) -> None:
    if not stream:
        choice = {"message": {"role": "assistant", "content": LONG}}
        conn.sendall(_response(JSON, orjson.dumps({"choices": [choice]}), length=True))
        return
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": LONG}}]}
    event = b"data: " + orjson.dumps(chunk) + b"\n\n"
    conn.sendall(_response(SSE, EVENTS.role, event, EVENTS.final, EVENTS.done))


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fails:
    """The attempt fails before its answer commits. `code`: the proxy's own error in OpenAI's
    shape; None: the upstream's error answer is relayed as it was."""

    outcome: str
    status: int
    code: str | None = None
    # False: a bad request, or a timeout after the request was sent (the upstream may still
    # be generating it), goes straight back: no other candidate, no retry
    moves_on: bool = True
    retried: bool = True  # False: a Retry-After over 10 s takes the upstream out of the request

    @property
    def no_retry(self) -> bool:
        """The client is told `x-should-retry: false`: the proxy retried, or would not."""
        return self.retried or not self.moves_on


@dataclass(frozen=True)
class Answers:
    content: str = ANSWER


@dataclass(frozen=True)
class Cuts:
    """The answer committed, then broke: an SSE error event ends the stream, no [DONE]."""

    reason: str
    code: str
    content: str


Then = Fails | Answers | Cuts


@dataclass(frozen=True)
class Row:
    fault: str
    upstream: Knobs | Script | str
    stream: bool
    then: Then
    route: dict[str, Any] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)  # over TIMEOUTS
    bug: str = ""
    api: str = "chat"  # or "responses": POST /v1/responses


def _rows(
    fault: str, upstream: Any, stream: Then, plain: Then | None = None, **kw: Any
) -> list[Row]:
    """The stream row and the non-stream row of one fault (`stream_bug`: the stream's only)."""
    stream_bug = kw.pop("stream_bug", "")
    return [
        Row(fault, upstream, True, stream, **{**kw, "bug": kw.get("bug", stream_bug)}),
        Row(fault, upstream, False, plain or stream, **kw),
    ]


def _status_rows() -> list[Row]:
    rows = []
    for status in (400, 401, 404, 429, 500, 503):
        outcome = {400: "status_4xx", 429: "status_429", 401: "status_auth", 404: "status_auth"}
        for retry_after in (None, 30.0):
            name = f"http_{status}" + ("" if retry_after is None else "_retry_after_30")
            then = Fails(
                outcome.get(status, "status_5xx"), status, None, status != 400, not retry_after
            )
            rows += _rows(name, Knobs(status=status, retry_after=retry_after), then)
    return rows


UNREACHABLE = Fails("connect_error", 502, "upstream_unreachable")
CUT_BEFORE_CONTENT = Fails("reset", 502, "upstream_protocol_error")
TIMED_OUT = Fails("timeout", 504, "upstream_timeout", moves_on=False)
FIRST_TOKEN_LATE = Fails("first_token_timeout", 504, "upstream_timeout")
RESET_CUT = Cuts("reset", "upstream_protocol_error", expected_content(SEED, 3))
IDLE_CUT = Cuts("idle_timeout", "upstream_timeout", expected_content(SEED, 1))
STREAM_ONLY = Answers()  # the knob shapes streams; a non-stream answer comes whole
TOO_LARGE = Fails("too_large", 502, "upstream_response_too_large")
FLOOD = 5 << 20  # bytes before the first event: past the default `server.max_event_bytes`
FIRST_TOKEN: dict[str, Any] = {"route": {"first_token_timeout": 0.3}}
SLOW_BY_IDLE: dict[str, Any] = {"timeouts": {"read": 5.0, "idle": 0.5}}
SLOW_BY_FIRST_TOKEN: dict[str, Any] = {**FIRST_TOKEN, "timeouts": {"read": 5.0, "idle": 5.0}}

# fmt: off
ROWS = [
    *_rows("connect_refused", "dead", UNREACHABLE),
    *_rows("reset_before_headers", _reset, CUT_BEFORE_CONTENT),
    *_rows("truncated_chunked_body", _truncated, CUT_BEFORE_CONTENT),
    *_rows("stall_before_headers", Knobs(ttft=3.0), TIMED_OUT),
    *_rows("headers_slower_than_idle_timeout", Knobs(ttft=1.0), Answers(), **SLOW_BY_IDLE),
    *_rows("headers_slower_than_first_token_timeout", Knobs(ttft=1.0), FIRST_TOKEN_LATE,
           **SLOW_BY_FIRST_TOKEN),
    *_rows("keepalive_flood_then_stall", Knobs(keepalives=20, ttft=3.0), FIRST_TOKEN_LATE,
           **FIRST_TOKEN),
    *_rows("stall_after_headers", Knobs(stall=3.0), TIMED_OUT),
    *_rows("stall_after_headers_past_idle", Knobs(stall=1.0), TIMED_OUT, **SLOW_BY_IDLE),
    *_rows("reset_mid_stream", fast(reset_after=3), RESET_CUT, STREAM_ONLY),
    *_rows("stall_mid_stream", fast(pause_after_first=3.0), IDLE_CUT, STREAM_ONLY),
    *_rows("stall_mid_stream_past_idle", fast(pause_after_first=1.0), IDLE_CUT, STREAM_ONLY,
           **SLOW_BY_IDLE),
    *_rows("json_for_stream", fast(json_for_stream=True), Answers()),
    *_rows("split_utf8", fast(split_utf8=True), Answers()),
    *_rows("garbage_lines_then_answer", _garbage_then_answer, Answers()),
    *_rows("ok_status_without_an_answer", _no_answer, CUT_BEFORE_CONTENT),
    *_rows("one_megabyte_event", _one_megabyte_event, Answers(LONG)),
    *_rows("ten_thousand_events", fast(tokens=10_000), Answers(expected_content(SEED, 10_000))),
    *_rows("gzip_despite_identity", fast(encoding="gzip"), Answers()),
    *_rows("brotli_despite_identity", fast(encoding="br"), STREAM_ONLY, CUT_BEFORE_CONTENT),
    *_rows("comments_past_max_event_bytes", fast(preamble=FLOOD), TOO_LARGE, STREAM_ONLY),
    *_rows("event_past_max_event_bytes", fast(preamble=FLOOD, preamble_as="event"), TOO_LARGE,
           STREAM_ONLY),
    *_status_rows(),
    *_rows("responses_reset_mid_stream", fast(reset_after=3), RESET_CUT, STREAM_ONLY,
           api=RESPONSES),
    *_rows("responses_stall_mid_stream", fast(pause_after_first=3.0), IDLE_CUT, STREAM_ONLY,
           api=RESPONSES),
    *_rows("responses_keepalive_flood_then_stall", Knobs(keepalives=20, ttft=3.0),
           FIRST_TOKEN_LATE, api=RESPONSES, **FIRST_TOKEN),
    *_rows("responses_split_events", fast(split_utf8=True), Answers(), api=RESPONSES),
    *_rows("responses_http_503", Knobs(status=503), Fails("status_5xx", 503), api=RESPONSES),
]
# fmt: on


def _name(row: Row, fallback: bool) -> str:
    mode = "stream" if row.stream else "plain"
    return f"{row.fault}-{mode}-{'fallback' if fallback else 'alone'}"


CELLS = [(row, fallback) for row in ROWS for fallback in (False, True)]
HEALTHY = fast()


# --- the servers ----------------------------------------------------------------------------


class Fleet:
    def __init__(self, tmp: Path, dead_port: int) -> None:
        knobs = {HEALTHY, *(r.upstream for r in ROWS if isinstance(r.upstream, Knobs))}
        self.mocks = {k: MockUpstream(k) for k in knobs}
        self.servers = {k: RunningServer(app) for k, app in self.mocks.items()}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(RunningServer.start, self.servers.values()))
        scripts = {r.upstream for r in ROWS if callable(r.upstream)}
        self.raws = {script: RawUpstream(script) for script in scripts}
        self.dead = f"http://127.0.0.1:{dead_port}/v1"
        path = tmp / "routes.yaml"
        path.write_text(self._config())
        self.records: list[RequestRecord] = []
        app = create_app(path, env={}, watch_interval=None, observers=(self.records.append,))
        self.proxy = RunningServer(app).start()

    def url_of(self, upstream: Knobs | Script | str) -> str:
        if isinstance(upstream, Knobs):
            return self.servers[upstream].url + "/v1"
        return self.raws[upstream].url + "/v1" if callable(upstream) else self.dead

    def _config(self) -> str:
        healthy = {"base_url": self.url_of(HEALTHY)}
        upstreams: dict[str, Any] = {"healthy": healthy}
        routes: list[Any] = [
            {"model": "healthy", "targets": [{"upstream": "healthy", "model": "m"}]}
        ]
        for row, fallback in CELLS:
            name, timeouts = _name(row, fallback), {**TIMEOUTS, **row.timeouts}
            upstreams[name] = {"base_url": self.url_of(row.upstream), "timeouts": timeouts}
            route = {"model": name, "retries": 1, **row.route}
            route["targets"] = [{"upstream": name, "model": "primary"}]
            if fallback:
                upstreams[name + "+fb"] = healthy
                route["fallbacks"] = [{"upstream": name + "+fb", "model": "fallback"}]
            routes.append(route)
        pricing = {m: {"input": 0, "output": 0} for m in ("m", "primary", "fallback")}
        return orjson.dumps({"upstreams": upstreams, "routes": routes, "pricing": pricing}).decode()

    def stop(self) -> None:
        self.proxy.stop()
        for server in self.servers.values():
            server.server.should_exit = True  # all shut down together, not one after another
        for server in self.servers.values():
            server.stop()
        for raw in self.raws.values():
            raw.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, dead_port: int) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("matrix"), dead_port)
    yield fleet
    fleet.stop()


# --- what the client got, and what /metrics counted -----------------------------------------

Series = tuple[str, frozenset[tuple[str, str]]]
WATCHED = {f"sluicegate_{n}_total" for n in ("requests", "upstream_attempts", "fallbacks")}
WATCHED.add("sluicegate_stream_errors_total")


def _scrape(proxy: RunningServer) -> dict[Series, float]:
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    samples = (s for family in families for s in family.samples if s.name in WATCHED)
    return {(s.name, frozenset(s.labels.items())): s.value for s in samples}


def _count(out: dict[Series, float], name: str, **labels: str) -> None:
    key = (f"sluicegate_{name}_total", frozenset(labels.items()))
    out[key] = out.get(key, 0) + 1


def _expected_deltas(row: Row, fallback: bool) -> dict[Series, float]:
    then, route = row.then, _name(row, fallback)
    primary = answered = route
    out: dict[Series, float] = {}
    model, status = "primary", 200
    if not isinstance(then, Fails):
        _count(out, "upstream_attempts", upstream=primary, outcome="ok")
    elif fallback and then.moves_on:
        answered, model = primary + "+fb", "fallback"
        _count(out, "upstream_attempts", upstream=primary, outcome=then.outcome)
        _count(out, "upstream_attempts", upstream=answered, outcome="ok")
        _count(out, "fallbacks", route=route, from_upstream=primary, to_upstream=answered,
               reason=then.outcome)  # fmt: skip
    else:
        for _ in range(2 if then.moves_on and then.retried else 1):
            _count(out, "upstream_attempts", upstream=primary, outcome=then.outcome)
        status = then.status
    if isinstance(then, Cuts):
        _count(out, "stream_errors", route=route, upstream=primary, reason=then.reason)
    _count(out, "requests", route=route, upstream=answered, model=model,
           stream=str(row.stream).lower(), status=str(status), key="_none")  # fmt: skip
    return out


def _request(
    url: str, model: str, stream: bool, rid: str, api: str = "chat"
) -> tuple[int, httpx.Headers, bytes]:
    body = {"model": model, "messages": MESSAGES, "stream": stream, "seed": SEED}
    url += "/v1/chat/completions"
    if api == RESPONSES:
        body = {"model": model, "input": MESSAGES, "stream": stream, "seed": SEED}
        url = url.replace("/v1/chat/completions", "/v1/responses")
    with httpx.stream("POST", url, json=body, headers={"x-request-id": rid}, timeout=15) as r:
        return r.status_code, r.headers, b"".join(r.iter_raw())


def _text(raw: bytes, stream: bool, api: str = "chat") -> str:
    if api == RESPONSES:
        return _responses_text(raw, stream)
    if not stream:
        return str(orjson.loads(raw)["choices"][0]["message"]["content"])
    parts = []
    for line in raw.split(b"\n"):
        try:
            chunk = orjson.loads(line[6:]) if line.startswith(b"data: {") else {}
        except orjson.JSONDecodeError:
            continue  # garbage an upstream sent, relayed as it was
        parts += [c["delta"].get("content") or "" for c in chunk.get("choices") or ()]
    return "".join(parts)


def _responses_text(raw: bytes, stream: bool) -> str:
    if not stream:
        output = orjson.loads(raw)["output"]
        return "".join(p["text"] for item in output for p in item.get("content") or ())
    deltas = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    return "".join(d["delta"] for d in deltas if d["type"] == "response.output_text.delta")


def _assert_openai_error(payload: bytes, code: str) -> None:
    error = orjson.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == code


def _assert_client_got(row: Row, fallback: bool, status: int, headers: Any, raw: bytes) -> None:
    then = row.then
    if isinstance(then, Fails) and not (fallback and then.moves_on):
        assert status == then.status, raw[:300]
        assert headers.get("x-should-retry") == ("false" if then.no_retry else None)
        if then.code is not None:
            _assert_openai_error(raw, then.code)
        else:  # the upstream's own error answer, relayed as it was
            assert raw == injected_error_body(then.status)
            assert headers.get("retry-after") == (None if then.retried else "30")
        return
    assert status == 200, raw[:300]
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    if row.api == RESPONSES:
        _assert_responses_end(events, then, row.stream)
    elif isinstance(then, Cuts):
        assert b"data: [DONE]" not in events
        assert events[-1].startswith(b"data: {")
        _assert_openai_error(events[-1][6:], then.code)
    elif row.stream:
        assert events[-1] == b"data: [DONE]"
        assert events.count(b"data: [DONE]") == 1
    assert _text(raw, row.stream, row.api) == (ANSWER if isinstance(then, Fails) else then.content)


def _assert_responses_end(events: list[bytes], then: Then, stream: bool) -> None:
    """A cut stream ends with the Responses API's own error event; a whole one completes."""
    if isinstance(then, Cuts):
        assert events[-1].startswith(b"event: error\ndata: {")
        error = orjson.loads(events[-1].split(b"data: ", 1)[1])
        assert set(error) == {"type", "code", "message", "param", "sequence_number"}
        assert (error["type"], error["code"]) == ("error", then.code)
    elif stream:
        assert events[-1].startswith(b"event: response.completed\n")


def _param(row: Row, fallback: bool) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=row.bug)] if row.bug else []
    return pytest.param(row, fallback, id=_name(row, fallback), marks=marks)


@pytest.mark.parametrize(("row", "fallback"), [_param(*cell) for cell in CELLS])
def test_fault_gives_the_documented_answer_and_metrics_and_the_proxy_serves_on(
    fleet: Fleet, row: Row, fallback: bool
) -> None:
    name = _name(row, fallback)
    proxy, rid = fleet.proxy, f"{name}-{time.monotonic_ns()}"
    before = _scrape(proxy)
    status, headers, raw = _request(proxy.url, name, row.stream, rid, row.api)
    assert wait_for(lambda: any(r.request_id == rid for r in fleet.records))
    after = _scrape(proxy)
    _assert_client_got(row, fallback, status, headers, raw)
    deltas = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert deltas == _expected_deltas(row, fallback)
    if isinstance(row.upstream, Knobs):  # the mock saw each attempt end: none was left open
        seen = [r for r in fleet.mocks[row.upstream].records if r.headers["x-request-id"] == rid]
        tried = sum(
            v
            for (n, labels), v in deltas.items()
            if "attempts" in n and ("upstream", name) in labels
        )
        assert len(seen) == tried
        assert wait_for(lambda: all(r.finished or r.disconnected for r in seen))
    status, _, raw = _request(proxy.url, "healthy", row.stream, rid + "-next")
    assert (status, _text(raw, row.stream)) == (200, ANSWER)


# --- the README's table -----------------------------------------------------------------------

BUGS = list(dict.fromkeys(row.bug for row in ROWS if row.bug))


def _describe(then: Then, fallback: bool) -> str:
    if isinstance(then, Answers):
        return "answer (`ok`)"
    if isinstance(then, Cuts):
        return f"200, cut: error event `{then.code}`, no `[DONE]`; stream error `{then.reason}`"
    if fallback and then.moves_on:
        return f"fallback's answer (`{then.outcome}`, then `ok`)"
    answer = f"{then.status} `{then.code}`" if then.code else f"{then.status} relayed"
    tries = 2 if then.moves_on and then.retried else 1
    advice = ", `x-should-retry: false`" if then.no_retry else ""
    return f"{answer} (`{then.outcome}` x{tries}){advice}"


def matrix_table() -> list[str]:
    lines = ["| fault | mode | alone | with a fallback | bug |", "|---|---|---|---|---|"]
    for row in ROWS:
        mode = "stream" if row.stream else "non-stream"
        bug = f"B{BUGS.index(row.bug) + 1}" if row.bug else ""
        alone, fallback = _describe(row.then, False), _describe(row.then, True)
        lines.append(f"| {row.fault} | {mode} | {alone} | {fallback} | {bug} |")
    return lines


def test_the_readme_table_lists_every_row_as_tested() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    assert [line for line in matrix_table() if line not in readme] == []
