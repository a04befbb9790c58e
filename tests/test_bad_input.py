"""Whatever a client or an operator sends, the proxy answers a clear 4xx (or refuses the config
with a ConfigError) and keeps serving. tests/README.md shows the tables (checked against this
file). Raw sockets send what httpx will not."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.api_request import APIS
from proxy.app import create_app
from proxy.config import Config, ConfigError, parse_config
from proxy.mock.content import stream_events
from proxy.mock.upstream import Knobs, MockUpstream, expected_content
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from proxy.sse import EventSplitter, parse
from tests.helpers import wait_for
from tests.test_metering import PROFILE

LIMIT = 10_000
OK = b'{"model": "bot", "messages": [{"role": "user", "content": "hi"}]}'
JSON = {"content-type": "application/json"}
ROOT = Path(__file__).resolve().parent.parent


class Proxy:
    def __init__(self, tmp: Path) -> None:
        self.mock = RunningServer(MockUpstream(Knobs(ttft=0.0, delay=0.0))).start()
        path = tmp / "routes.yaml"
        path.write_text(
            f"server: {{max_body_bytes: {LIMIT}, body_timeout: 0.5}}\n"
            f"upstreams:\n  mock: {{base_url: '{self.mock.url}/v1'}}\n"
            "routes:\n  - {model: bot, targets: [{upstream: mock, model: m}]}\n"
        )
        self.records: list[RequestRecord] = []
        app = create_app(path, env={}, watch_interval=None, observers=(self.records.append,))
        self.server = RunningServer(app).start()
        self.url, self.port = self.server.url, self.server.port


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    running = Proxy(tmp_path_factory.mktemp("bad-input"))
    yield running
    running.server.stop()
    running.mock.stop()


def _assert_openai_error(r: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == code
    return dict(error)


def _assert_still_serving(proxy: Proxy, rid: str = "still-serving") -> None:
    assert httpx.get(proxy.url + "/healthz", timeout=5).json() == {"status": "ok"}
    headers = {"x-request-id": rid, **JSON}
    r = httpx.post(proxy.url + "/v1/chat/completions", content=OK, headers=headers, timeout=5)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == expected_content(0, 16)


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """Reads one response from a raw socket: its status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"EOF\r\n\r\n"
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = next((int(h[15:]) for h in lines if h.startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), body


def _exchange(proxy: Proxy, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        return _response(sock)


def _post(*headers: bytes, body: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
        + body
    )


# --- bodies the proxy reads and refuses, in OpenAI's shape ------------------------------------

NO_MODEL, TOO_LARGE = "model_not_found", "request_too_large"
MSG = b'"messages": [{"role": "user", "content": "hi"}]'


def _deep(levels: int) -> bytes:
    """A valid request with a value `levels` deep, the body object counted."""
    return (
        b'{"model": "bot", ' + MSG + b', "x": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"
    )


BODIES = [
    ("empty-body", b"", 400, "invalid_json", None),
    ("truncated-json", b'{"model": "bot", "messages": [', 400, "invalid_json", None),
    ("trailing-garbage", OK + b" x", 400, "invalid_json", None),
    ("two-documents", OK + OK, 400, "invalid_json", None),
    ("nan-literal", b'{"model": "bot", "n": NaN, ' + MSG + b"}", 400, "invalid_json", None),
    ("nested-5000-deep", b"[" * 5000 + b"]" * 5000, 400, "invalid_json", None),
    ("nested-255-deep", _deep(255), 400, "invalid_json", None),  # orjson writes 254 at most
    ("nested-1023-deep", _deep(1023), 400, "invalid_json", None),  # orjson reads this deep
    ("invalid-utf8-in-string", OK.replace(b"hi", b"h\xffi"), 400, "invalid_json", None),
    ("lone-surrogate-escape", OK.replace(b"hi", b"\\ud800"), 400, "invalid_json", None),
    ("utf16-body", OK.decode().encode("utf-16"), 400, "invalid_json", None),
    ("utf8-bom", b"\xef\xbb\xbf" + OK, 400, "invalid_json", None),
    ("top-level-array", b"[" + OK + b"]", 400, "invalid_json", None),
    ("top-level-null", b"null", 400, "invalid_json", None),
    ("missing-model", b"{" + MSG + b"}", 400, None, "model"),
    ("model-number", b'{"model": 42, ' + MSG + b"}", 400, None, "model"),
    ("model-null", b'{"model": null, ' + MSG + b"}", 400, None, "model"),
    ("model-empty", b'{"model": "", ' + MSG + b"}", 400, None, "model"),
    ("model-list", b'{"model": ["bot"], ' + MSG + b"}", 400, None, "model"),
    ("missing-messages", b'{"model": "bot"}', 400, None, "messages"),
    ("messages-string", b'{"model": "bot", "messages": "hi"}', 400, None, "messages"),
    ("messages-object", b'{"model": "bot", "messages": {}}', 400, None, "messages"),
    ("messages-empty", b'{"model": "bot", "messages": []}', 400, None, "messages"),
    ("stream-string", b'{"model": "bot", "stream": "true", ' + MSG + b"}", 400, None, "stream"),
    ("stream-number", b'{"model": "bot", "stream": 1, ' + MSG + b"}", 400, None, "stream"),
    ("unknown-model", b'{"model": "gpt-17", ' + MSG + b"}", 404, NO_MODEL, "model"),
    ("unicode-model", '{"model": "模型🙂", "messages": [1]}'.encode(), 404, NO_MODEL, "model"),
    ("over-limit", b'{"model": "bot", "pad": "' + b"x" * LIMIT + b'"}', 413, TOO_LARGE, None),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "param"), [p[1:] for p in BODIES],
                         ids=[p[0] for p in BODIES])  # fmt: skip
def test_a_bad_body_gets_a_clear_4xx_in_openai_shape_and_is_counted_once(
    proxy: Proxy, body: bytes, status: int, code: str | None, param: str | None
) -> None:
    rid = f"bad-{time.monotonic_ns()}"
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=body,
        headers={"x-request-id": rid, **JSON},
        timeout=5,
    )
    assert _assert_openai_error(r, status, code)["param"] == param
    assert r.headers["x-request-id"] == rid
    assert wait_for(lambda: [x.status for x in proxy.records if x.request_id == rid] == [status])
    _assert_still_serving(proxy)


def test_a_body_exactly_at_the_limit_is_served(proxy: Proxy) -> None:
    body = OK[:-1] + b" " * (LIMIT - len(OK)) + b"}"
    assert len(body) == LIMIT
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers=JSON, timeout=5)
    assert r.status_code == 200


def test_a_chunked_body_over_the_limit_is_413(proxy: Proxy) -> None:
    chunks = (b" " * 1000 for _ in range(1000))  # 1 MB without a length, 100x the limit
    r = httpx.post(proxy.url + "/v1/chat/completions", content=chunks, headers=JSON, timeout=5)
    _assert_openai_error(r, 413, "request_too_large")
    _assert_still_serving(proxy)


@pytest.mark.parametrize(
    ("framing", "part"),
    [(b"content-length: 100", b'{"model"'), (b"transfer-encoding: chunked", b'8\r\n{"model')],
    ids=["content-length", "chunked"],
)
def test_a_body_that_stops_arriving_gets_408_and_others_are_served_meanwhile(
    proxy: Proxy, framing: bytes, part: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as stalled:
        stalled.sendall(_post(framing, body=part))
        _assert_still_serving(proxy)  # the stalled client holds nothing up
        status, body = _response(stalled)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


def test_a_body_trickled_byte_by_byte_past_the_timeout_gets_408(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_post(b"content-length: %d" % len(OK)))
        for byte in OK:  # never silent for long, but 65 x 20 ms is past body_timeout 0.5 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # the proxy answered and closed
            time.sleep(0.02)
        assert _response(sock)[0] == 408
    _assert_still_serving(proxy)


def test_a_client_that_leaves_mid_body_is_recorded_as_gone_not_logged_as_a_crash(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("uvicorn.error").addHandler(caplog.handler)  # it does not propagate
    try:
        rid = f"leaves-{time.monotonic_ns()}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(_post(b"content-length: 100", b"x-request-id: " + rid.encode()))
        assert wait_for(lambda: any(r.request_id == rid for r in proxy.records))
        _assert_still_serving(proxy)  # served after the abandoned one finished, on one loop
    finally:
        logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert next(r for r in proxy.records if r.request_id == rid).client_disconnected


# --- what the HTTP parser refuses before the proxy sees it ------------------------------------

HUGE = b"content-length: 1000000000000000000"
RAW = [
    ("content-length-10^18", _post(HUGE, body=OK), 413),  # refused by its length, unread
    ("content-length-negative", _post(b"content-length: -1", body=OK), 400),
    ("content-length-not-a-number", _post(b"content-length: abc", body=OK), 400),
    ("content-length-twice-differing", _post(b"content-length: 5", b"content-length: 6"), 400),
    ("content-length-and-chunked", _post(b"content-length: 5", b"transfer-encoding: chunked"), 400),
    ("bad-chunk-size", _post(b"transfer-encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"), 400),
    ("transfer-encoding-gzip", _post(b"transfer-encoding: gzip", body=OK), 400),
    ("nul-in-header-name", _post(b"x-a\x00b: 1", b"content-length: 2", body=b"{}"), 400),
    ("header-without-colon", _post(b"garbage", b"content-length: 2", body=b"{}"), 400),
    ("unknown-method", b"BREW /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    ("http-9.9", b"POST /v1/chat/completions HTTP/9.9\r\nhost: x\r\n\r\n", 400),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), 400),
    ("url-64kb", b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 431),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status"), [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_malformed_http_gets_a_clean_4xx_and_the_proxy_keeps_serving(
    proxy: Proxy, request_bytes: bytes, status: int
) -> None:
    got, body = _exchange(proxy, request_bytes)
    assert got == status
    if status == 431:  # ours, in OpenAI's shape; the parser's 400s are plain text
        assert orjson.loads(body)["error"]["code"] == "headers_too_large"
    _assert_still_serving(proxy)


HEADER_FLOOD = [
    ("500-headers-of-128-bytes", [b"x-h%d: %s" % (i, b"v" * 120) for i in range(500)]),
    ("one-64kb-header", [b"x-big: " + b"v" * 65536]),
]


@pytest.mark.parametrize("headers", [h[1] for h in HEADER_FLOOD], ids=[h[0] for h in HEADER_FLOOD])
def test_a_header_flood_gets_a_clean_4xx(proxy: Proxy, headers: list[bytes]) -> None:
    request = _post(*headers, b"content-length: %d" % len(OK), body=OK)
    status = _exchange(proxy, request)[0]
    _assert_still_serving(proxy)
    assert 400 <= status < 500


# --- paths and methods ------------------------------------------------------------------------


PATHS = [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("POST", "/v1/assistants", 404, "not_found"),
    ("GET", "/v1/responses", 405, "method_not_allowed"),
    ("PUT", "/v1/responses/resp_1", 405, "method_not_allowed"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("PUT", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
    ("OPTIONS", "/v1/chat/completions", 405, "method_not_allowed"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
    ("POST", "/healthz", 405, "method_not_allowed"),
    ("POST", "/metrics", 405, "method_not_allowed"),
    ("GET", "/%6detrics", 404, "not_found"),  # percent-decoded, it would be /metrics
    ("GET", "/%68ealthz", 404, "not_found"),
    ("POST", "/v1/chat/%63ompletions", 404, "not_found"),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), PATHS)
def test_unknown_paths_and_methods_get_404_or_405_in_openai_shape(
    proxy: Proxy, method: str, path: str, status: int, code: str
) -> None:
    probe, check = f"probe-{method}-{path}", f"check-{method}-{path}"
    r = httpx.request(method, proxy.url + path, content=OK, headers={"x-request-id": probe})
    _assert_openai_error(r, status, code)
    if status == 404:  # the answer says what is served, every API included
        assert all(api in r.json()["error"]["message"] for api in APIS)
    _assert_still_serving(proxy, check)
    # Only the check request reached the chat endpoint (its record comes after its answer);
    # ids, not counts: an earlier test's slow client may be recorded in the meantime.
    assert wait_for(lambda: any(rec.request_id == check for rec in proxy.records))
    assert [rec.status for rec in proxy.records if rec.request_id == check] == [200]
    assert not [rec for rec in proxy.records if rec.request_id == probe]


# --- properties of the pure parsers -----------------------------------------------------------

PRELUDES = [
    b": keep-alive\n\n",
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{}}]}\n\n',
    b'data: {"choices":[]}\n\n',
    b"event: ping\ndata: {not json\n\n",
]
FIRSTS = [
    b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n',
]


@st.composite
def openai_streams(draw: st.DrawFn) -> bytes:
    prelude = b"".join(draw(st.lists(st.sampled_from(PRELUDES), max_size=6)))
    events = stream_events(draw(st.integers(0, 999)), "m", draw(st.integers(0, 4)), "stop", True)
    answer = b"".join((*events.content, events.final, events.usage_event(3, 4), events.done))
    first = draw(st.sampled_from([b"", *FIRSTS]))
    stream = prelude + events.role + first + answer
    return stream.replace(b"\n", b"\r\n") if draw(st.booleans()) else stream


def _first_content(chunks: list[bytes]) -> tuple[int, Any] | None:
    splitter, seen = EventSplitter(), 0
    for chunk in chunks:
        for event in splitter.feed(chunk):
            kind, payload = parse(event)
            if kind == "content":
                return seen, payload
            seen += 1
    return None


@PROFILE
@given(openai_streams(), st.data())
def test_any_split_of_a_stream_finds_the_same_first_content_event(
    stream: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=30)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = _first_content([stream])
    assert whole is not None
    assert _first_content(chunks) == whole


ROUTES_YAML = (ROOT / "routes.yaml").read_text()
KEYS = {"DEEPSEEK_API_KEY": "sk-1", "GEMINI_API_KEY": "sk-2"}
VALUES = ["-1", "0", "1e9", ".nan", ".inf", "~", "''", "[]", "{}", "true", "x", "${NOPE}",
          "'${NOPE'", "&a [1]", "!!int x", "!env X", "9" * 30, "ftp://x", "http://", "-",
          "https://h:99999", "0x10", "2001-01-01", "1_000", "é🙂", "auto", "strip", "3",
          "least_inflight", "{failures: 0}", "{connect: -1, read: x}", "[{upstream: local}]",
          "{upstream: nope, model: m}", "{input: -1, output: 1}"]  # fmt: skip
BROKEN = ["[unclosed", "{a: 1", "'open", "\t1", "*nope", "<<: *a", "\x00", "`", "@", "|"]
JUNK = ["junk", "max_bodybytes", "<<", "- item", "'quoted'", "1", "null", "base_url", "model",
        "targets", "fallbacks", "timeouts", "&k key", "[a]", "{b: 1}"]  # fmt: skip


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


@st.composite
def mutated_routes(draw: st.DrawFn) -> str:
    lines = ROUTES_YAML.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines) - 1))
        value = draw(st.sampled_from(BROKEN if draw(st.integers(0, 7)) == 0 else VALUES))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "scalar", "scalar", "junk"]))
        if op == "delete" and len(lines) > 1:
            del lines[at]
        elif op == "duplicate":
            lines.insert(at, lines[at])
        elif op == "swap":  # with a line of the same indentation, so the YAML mostly holds
            peers = [i for i, line in enumerate(lines) if _indent(line) == _indent(lines[at])]
            other = draw(st.sampled_from(peers))
            lines[at], lines[other] = lines[other], lines[at]
        elif op == "scalar":
            key, _, _ = lines[at].partition(": ")
            lines[at] = f"{key}: {value}"
        else:
            indent = " " * draw(st.sampled_from([_indent(lines[at])] * 4 + [0, 3]))
            lines.insert(at, f"{indent}{draw(st.sampled_from(JUNK))}: {value}")
    return "\n".join(lines) + "\n"


@PROFILE
@given(mutated_routes(), st.sampled_from([{}, KEYS]))
def test_a_mutated_routes_file_gives_a_config_or_a_config_error_naming_the_file(
    text: str, env: dict[str, str]
) -> None:
    try:
        config = parse_config(text, "routes.yaml", env)
    except ConfigError as exc:  # anything else fails the test
        error = exc
    else:
        assert isinstance(config, Config)
        return
    assert error.issues
    assert all(issue.message.strip() for issue in error.issues)
    assert all(str(issue).startswith("routes.yaml") for issue in error.issues)
    assert str(error).startswith("routes.yaml")


def test_the_committed_routes_file_parses_with_its_keys_set() -> None:
    assert isinstance(parse_config(ROUTES_YAML, "routes.yaml", KEYS), Config)


DEEP = "routes: " + "[" * 3000 + "]" * 3000 + "\n"


@pytest.mark.parametrize("text", [DEEP, "".join(" " * i + "a:\n" for i in range(3000))],
                         ids=["flow", "block"])  # fmt: skip
def test_deeply_nested_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml", {})
    assert str(info.value).startswith("routes.yaml:1: ")


def test_a_deeply_nested_edit_is_refused_and_later_edits_still_reload(
    tmp_path: Path, proxy: Proxy
) -> None:
    path = tmp_path / "routes.yaml"
    routes = "routes:\n  - {model: a, targets: [{upstream: mock, model: m}]}\n"
    upstreams = f"upstreams:\n  mock: {{base_url: '{proxy.mock.url}/v1'}}\n"
    path.write_text(upstreams + routes)
    app = create_app(path, env={}, watch_interval=0.02)
    with RunningServer(app) as server:

        def models() -> list[str]:
            return [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]

        path.write_text(DEEP)
        # >= 1: the watcher may also catch the file half-written, which is refused too.
        assert wait_for(lambda: app.state.reloader.refused >= 1, 10)
        path.write_text(upstreams + routes + routes.replace("model: a", "model: b")[8:])
        assert wait_for(lambda: models() == ["a", "b"], 10)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://h:abc/v1"])
def test_a_base_url_with_an_impossible_port_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        parse_config(ROUTES_YAML.replace("https://api.deepseek.com/v1", url), "routes.yaml", KEYS)


# --- the README's table -----------------------------------------------------------------------


WHO = {
    413: "`request_too_large`, body unread",
    431: "`headers_too_large`, refused as the bytes arrive",
}


def bad_input_table() -> list[str]:
    lines = ["| input | expected |", "|---|---|"]
    for name, _, status, code, param in BODIES:
        lines.append(
            f"| body: {name} | {status} " + (f"`{code}` |" if code else f"param `{param}` |")
        )
    for name, _, status in RAW:
        who = WHO.get(status, "from the HTTP parser")
        lines.append(f"| http: {name} | {status} {who} |")
    for name, _ in HEADER_FLOOD:
        lines.append(f"| http: {name} | a clean 4xx (431) |")
    lines += [f"| {m} {path} | {status} `{code}` |" for m, path, status, code in PATHS]
    return lines


def test_the_readme_table_lists_every_row_as_tested() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    assert [line for line in bad_input_table() if line not in readme] == []
