"""Every error row answers in OpenAI's shape with the right status, and the proxy keeps serving;
every error is defined in proxy/errors.py and drawn, as it is, in that module's tree."""

from __future__ import annotations

import importlib
import pkgutil
import re
import socket
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

import proxy
from proxy import app as app_module
from proxy import errors
from proxy.errors import ProxyError, RateLimited
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY
from tests.helpers import wait_for

# A row of the docstring tree: its indent (the depth), the class, status, type and code.
TREE_ROW = re.compile(r"^(?P<indent>[ │]*)[├└]── (?P<name>\w+) +(\d{3}) +(\S+) +(\S+)$")
JSON = {"content-type": "application/json"}
OK_BODY = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}


def _post(proxy: RunningServer, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )


def _assert_openai_error(r: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == code
    return dict(error)


def _assert_still_serving(proxy: RunningServer) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", json=OK_BODY, timeout=10)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("content", "status", "code", "param"),
    [
        (b'{"model": "support-bot", "messages": [', 400, "invalid_json", None),
        (b"\xff\xfe not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, None, "model"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', 400, None, "model"),
        (b'{"model": "support-bot"}', 400, None, "messages"),
        (b'{"model": "support-bot", "messages": "hi"}', 400, None, "messages"),
        (
            b'{"model": "support-bot", "messages": [{"role": "user"}], "stream": "yes"}',
            400,
            None,
            "stream",
        ),
        (
            b'{"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
            "model",
        ),
    ],
    ids=[
        "truncated-json",
        "invalid-utf8",
        "not-an-object",
        "missing-model",
        "model-not-string",
        "missing-messages",
        "messages-not-array",
        "stream-not-bool",
        "unknown-model",
    ],
)
def test_bad_requests(
    proxy: RunningServer, content: bytes, status: int, code: str | None, param: str | None
) -> None:
    error = _assert_openai_error(_post(proxy, content), status, code)
    assert error["param"] == param
    _assert_still_serving(proxy)


def test_unknown_model_raises_not_found_in_the_sdk(proxy: RunningServer) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    _assert_still_serving(proxy)


def test_body_over_limit_is_413(make_proxy: Any) -> None:
    proxy = make_proxy(max_body=1000)
    big = {**OK_BODY, "messages": [{"role": "user", "content": "x" * 2000}]}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=big, timeout=10)
    _assert_openai_error(r, 413, "request_too_large")
    _assert_still_serving(proxy)


def test_chunked_body_over_limit_is_413(make_proxy: Any) -> None:
    proxy = make_proxy(max_body=1000)

    def chunks() -> Any:
        for _ in range(20):
            yield b" " * 100

    r = httpx.post(proxy.url + "/v1/chat/completions", content=chunks(), headers=JSON, timeout=10)
    _assert_openai_error(r, 413, "request_too_large")
    _assert_still_serving(proxy)


def test_a_body_that_never_finishes_gets_408(make_proxy: Any) -> None:
    proxy = make_proxy(body_timeout=0.5)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"model"'
        )
        sock.settimeout(10)
        answer = b""
        while b"}}" not in answer and (part := sock.recv(65536)):  # headers, then the body
            answer += part
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    _assert_still_serving(proxy)


def test_unreachable_upstream_is_502(proxy: RunningServer) -> None:
    body = {**OK_BODY, "model": "nowhere"}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    error = _assert_openai_error(r, 502, "upstream_unreachable")
    assert "dead" in error["message"]
    _assert_still_serving(proxy)


def test_upstream_timeout_is_504(make_proxy: Any) -> None:
    proxy = make_proxy(read_timeout=0.5)
    body = {**OK_BODY, "mock": {"ttft": 3.0}}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    _assert_openai_error(r, 504, "upstream_timeout")
    _assert_still_serving(proxy)


def test_non_stream_answer_slower_than_total_is_504(make_proxy: Any) -> None:
    proxy = make_proxy(total=1.0)
    # The mock sends a non-stream answer whole, after ttft + 40 tokens x 50 ms = 2.1 s.
    body = {**OK_BODY, "mock": {"ttft": 0.1, "tokens": 40, "delay": 0.05}}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    _assert_openai_error(r, 504, "upstream_timeout")
    _assert_still_serving(proxy)


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_status_and_body_are_relayed(
    proxy: RunningServer, mock_server: RunningServer, status: int, stream: bool
) -> None:
    body = {**OK_BODY, "stream": stream, "mock": {"status": status, "retry_after": 0.01}}
    via = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    direct = httpx.post(
        mock_server.url + "/v1/chat/completions", json={**body, "model": "mock-chat"}, timeout=10
    )
    assert via.status_code == status
    assert via.content == direct.content
    assert via.headers["retry-after"] == direct.headers["retry-after"]
    _assert_still_serving(proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_that_echoes_the_key_is_relayed_without_it(
    proxy: RunningServer, mock_server: RunningServer, mock_app: MockUpstream, stream: bool
) -> None:
    body = {**OK_BODY, "stream": stream, "mock": {"status": 401, "echo_auth": True}}
    via = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    assert mock_app.records[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    direct = httpx.post(
        mock_server.url + "/v1/chat/completions",
        json={**body, "model": "mock-chat"},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        timeout=10,
    )
    assert UPSTREAM_KEY in direct.text
    assert UPSTREAM_KEY in direct.headers["www-authenticate"]
    assert via.status_code == 401
    assert via.content == direct.content.replace(UPSTREAM_KEY.encode(), b"***")
    # The upstream's challenge is about its own key, not the client's: the allowlist keeps it.
    assert "www-authenticate" not in via.headers
    assert "Bearer ***" in via.json()["error"]["message"]


def test_a_bug_behind_a_small_endpoint_is_a_500_and_one_log_line(
    proxy: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "model_entries", broken)
    with capture_logs() as events:
        r = httpx.get(proxy.url + "/v1/models", timeout=10)
        # Logged once the answer has gone out: possibly after the client has it.
        assert wait_for(lambda: any(e["event"] == "unhandled_error" for e in events))
    _assert_openai_error(r, 500, "internal_error")
    assert r.headers["connection"] == "close"
    errors = [event for event in events if event["log_level"] == "error"]
    assert [event["event"] for event in errors] == ["unhandled_error"]
    assert isinstance(errors[0]["exc_info"], RuntimeError)
    _assert_still_serving(proxy)


def test_unknown_path_and_wrong_method(proxy: RunningServer) -> None:
    _assert_openai_error(httpx.get(proxy.url + "/v1/nothing", timeout=10), 404, "not_found")
    r = httpx.get(proxy.url + "/v1/chat/completions", timeout=10)
    _assert_openai_error(r, 405, "method_not_allowed")
    _assert_still_serving(proxy)


def test_health_and_readiness(proxy: RunningServer) -> None:
    assert httpx.get(proxy.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(proxy.url + "/readyz").json() == {"status": "ready"}


def _all_modules() -> list[str]:
    """Every module under proxy/, imported (one that fails to import fails the test); not
    `proxy.__main__`, which runs the command line."""
    found = pkgutil.walk_packages(proxy.__path__, "proxy.")
    names = [info.name for info in found if info.name != "proxy.__main__"]
    for name in names:
        importlib.import_module(name)
    return names


def _subclasses(cls: type[ProxyError]) -> list[type[ProxyError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _tree() -> dict[str, tuple[str, str, str, str]]:
    """errors.py's docstring tree: class name -> (parent, status, type, code)."""
    rows: dict[str, tuple[str, str, str, str]] = {}
    parents = ["ProxyError"]  # parents[d] is the parent of a row at depth d
    for line in (errors.__doc__ or "").splitlines():
        if match := TREE_ROW.match(line.removeprefix("    ")):
            indent, name, status, type_, code = match.groups()
            depth = len(indent) // 4
            del parents[depth + 1 :]
            rows[name] = (parents[depth], status, type_, code)
            parents.append(name)
    return rows


def _cells(cls: type[ProxyError]) -> tuple[str, str, str]:
    """status, type and code as the class answers them: `(given)` for a code the raiser sets,
    `a|b` for the values an error takes per instance (RateLimited's type: what ran out)."""
    if cls is RateLimited:
        samples: list[ProxyError] = [RateLimited("m", kind, 1.0) for kind in ("requests", "tokens")]
    else:
        samples = [cls("message")]

    def cell(attr: str) -> str:
        return "|".join(dict.fromkeys(str(getattr(s, attr) or "(given)") for s in samples))

    return cell("status"), cell("type"), cell("code")


def test_every_proxy_error_is_defined_in_errors_py() -> None:
    modules = _all_modules()
    assert {"proxy.endpoint", "proxy.state", "proxy.observe.metrics_server"} <= set(modules)
    outside = {
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _subclasses(ProxyError)
        if cls.__module__.split(".")[0] == "proxy" and cls.__module__ != "proxy.errors"
    }
    assert outside == set()


def test_the_docstring_tree_draws_every_error_as_it_is() -> None:
    _all_modules()
    tree = _tree()
    ours = [cls for cls in _subclasses(ProxyError) if cls.__module__ == "proxy.errors"]
    assert {cls.__name__ for cls in ours} == set(tree)
    for cls in ours:
        assert tree[cls.__name__] == (cls.__base__.__name__, *_cells(cls)), cls.__name__


def test_the_tree_reader_sees_nesting_given_codes_and_alternatives() -> None:
    tree = _tree()
    assert tree["MetricsUnauthorized"] == (
        "Unauthorized",
        "401",
        "invalid_request_error",
        "invalid_api_key",
    )
    assert tree["BadRequest"] == ("ProxyError", "400", "invalid_request_error", "(given)")
    assert tree["RateLimited"][2] == "requests|tokens"
    assert tree["UpstreamTimeout"][0] == "ProxyError"  # the last row, after a nested one
