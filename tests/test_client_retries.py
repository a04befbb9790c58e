"""No retry storms, with the real SDKs: how many requests one SDK call makes upstream.

openai-python (and openai-node, in tests/node/retries.mjs) retry 429, 5xx and timeouts twice by
default and obey `x-should-retry`. Each SDK call here is tagged with its own `x-request-id`,
which the proxy sends upstream, so the mock counts exactly the requests that call caused.
Routes have upstream names of their own, so each test starts with a fresh retry budget.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.app import create_app
from proxy.errors import UpstreamUnreachable
from proxy.mock.upstream import MockUpstream, expected_content
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from proxy.upstream import to_proxy_error
from tests.helpers import wait_for
from tests.test_openai_node import NODE_DIR, _installed_sdk

MESSAGES: Any = [{"role": "user", "content": "还有货吗?"}]
QUICK = {"connect": 0.3, "read": 0.3, "idle": 0.3}  # the slow upstream's ttft is past these
SLOW = {"ttft": 1.0}
LIMITED = {"status": 429, "retry_after": 0.05}  # a short Retry-After keeps the SDK's wait short
FAILING = {"status": 503}


class Servers:
    """A primary mock that obeys the body's `fault` knobs, a healthy fallback that does not, a
    port that never accepts a connection, and one proxy in front with a route per case."""

    def __init__(self, tmp: Path) -> None:
        self.primary, self.fallback = MockUpstream(faults=True), MockUpstream()
        self.mocks = [RunningServer(self.primary).start(), RunningServer(self.fallback).start()]
        # A full accept queue: the kernel drops further SYNs, so connecting hangs.
        self.blackhole = socket.socket()
        self.blackhole.bind(("127.0.0.1", 0))
        self.blackhole.listen(0)
        self.queued = socket.create_connection(self.blackhole.getsockname())
        self.records: list[RequestRecord] = []
        path = tmp / "routes.yaml"
        path.write_text(orjson.dumps(self._config()).decode())
        app = create_app(path, env={}, watch_interval=None, observers=(self.records.append,))
        self.proxy = RunningServer(app).start()

    def _config(self) -> dict[str, Any]:
        primary, fallback = self.mocks[0].url + "/v1", self.mocks[1].url + "/v1"
        port = self.blackhole.getsockname()[1]
        upstreams: dict[str, Any] = {"fallback": {"base_url": fallback}}
        routes = []
        for name, retries, route in [
            ("slow", 2, {"fallbacks": [{"upstream": "fallback", "model": "fb"}]}),
            ("slow-resent", 2, {"fallbacks": [{"upstream": "fallback", "model": "fb"}]}),
            ("blackhole", 2, {"fallbacks": [{"upstream": "fallback", "model": "fb"}]}),
            (
                "hedged",
                2,
                {"fallbacks": [{"upstream": "fallback", "model": "fb"}], "hedge_after": 0.1},
            ),
            *[(f"storm-{n}", 2, {}) for n in range(4)],
            *[(f"alone-{n}", 0, {}) for n in range(2)],
        ]:
            upstream = {"base_url": primary, "timeouts": QUICK, "cooldown": {"failures": 100}}
            if name == "slow-resent":
                upstream["retry_on_timeout"] = True
            if name == "blackhole":
                upstream["base_url"] = f"http://127.0.0.1:{port}/v1"
                upstream["timeouts"] = {**QUICK, "read": 5.0}  # connecting is what times out
            upstreams[name] = upstream
            target = [{"upstream": name, "model": "primary"}]
            routes.append({"model": name, "targets": target, "retries": retries, **route})
        return {"upstreams": upstreams, "routes": routes}

    def seen(self, mock: MockUpstream, tag: str) -> int:
        return sum(r.headers.get("x-request-id") == tag for r in mock.records)

    def stop(self) -> None:
        self.proxy.stop()
        for server in self.mocks:
            server.stop()
        self.queued.close()
        self.blackhole.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("retries"))
    yield running
    running.stop()


def _call(
    servers: Servers, route: str, fault: dict[str, Any], *, max_retries: int
) -> tuple[str, openai.APIStatusError]:
    """One SDK call, which must fail: its tag and the error the SDK raised in the end."""
    tag = uuid.uuid4().hex
    client = openai.OpenAI(
        base_url=servers.proxy.url + "/v1", api_key="k", max_retries=max_retries, timeout=20
    )
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=route,
            messages=MESSAGES,
            extra_body={"fault": fault},
            extra_headers={"x-request-id": tag},
        )
    return tag, info.value


def _advice(servers: Servers, tag: str) -> list[bool | None]:
    """What each proxy request of the call tagged `tag` logged as `should_retry`."""
    return [r.should_retry for r in servers.records if r.request_id == tag]


def _attempts(servers: Servers, tag: str) -> list[list[str]]:
    """The outcomes of each proxy request of the SDK call tagged `tag`."""
    mine = [r for r in servers.records if r.request_id == tag]
    return [[a.outcome for a in r.attempts] for r in mine]


# --- timeouts sized for LLMs ----------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 2])
def test_an_answer_slower_than_the_read_timeout_is_asked_for_once_per_sdk_call(
    servers: Servers, max_retries: int
) -> None:
    tag, error = _call(servers, "slow", SLOW, max_retries=max_retries)
    assert error.status_code == 504
    assert error.response.headers["x-should-retry"] == "false"  # the SDK did not re-send it
    assert orjson.loads(error.response.content)["error"]["code"] == "upstream_timeout"
    # Not re-sent, not even to the fallback: the upstream may still be generating it.
    assert (servers.seen(servers.primary, tag), servers.seen(servers.fallback, tag)) == (1, 0)
    assert wait_for(lambda: _attempts(servers, tag) == [["timeout"]])
    assert _advice(servers, tag) == [False]


def _answered(servers: Servers, route: str, seed: int, body: dict[str, Any]) -> str:
    """One SDK call, which must be answered (by the fallback, here); returns its tag."""
    tag = uuid.uuid4().hex
    client = openai.OpenAI(base_url=servers.proxy.url + "/v1", api_key="k", max_retries=0)
    answer = client.chat.completions.create(
        model=route,
        messages=MESSAGES,
        seed=seed,
        extra_body=body,
        extra_headers={"x-request-id": tag},
    )
    assert answer.choices[0].message.content == expected_content(seed, 16)
    return tag


def test_an_upstream_with_retry_on_timeout_has_its_timeouts_re_sent(servers: Servers) -> None:
    tag = _answered(servers, "slow-resent", 3, {"fault": SLOW})
    assert (servers.seen(servers.primary, tag), servers.seen(servers.fallback, tag)) == (1, 1)
    assert wait_for(lambda: _attempts(servers, tag) == [["timeout", "ok"]])


def test_a_timeout_starts_no_new_candidate_but_a_hedge_running_may_still_win(
    servers: Servers,
) -> None:
    # The hedge (the fallback) starts at 0.1 s and answers at ~0.6 s; the primary times out at
    # 0.3 s, which must not start its retry.
    tag = _answered(servers, "hedged", 5, {"mock": {"ttft": 0.6}, "fault": SLOW})
    assert (servers.seen(servers.primary, tag), servers.seen(servers.fallback, tag)) == (1, 1)
    assert wait_for(lambda: [sorted(a) for a in _attempts(servers, tag)] == [["ok", "timeout"]])


def test_a_connect_timeout_sent_nothing_so_the_next_candidate_is_tried(servers: Servers) -> None:
    tag = _answered(servers, "blackhole", 4, {})
    assert wait_for(lambda: _attempts(servers, tag) == [["connect_error", "ok"]])


def test_aiohttp_s_connect_timeout_is_an_unreachable_upstream() -> None:
    error = to_proxy_error(aiohttp.ConnectionTimeoutError("connecting"), "u", reading=False)
    assert isinstance(error, UpstreamUnreachable)


# --- no retry storms --------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "fault"), [("storm-0", LIMITED), ("storm-1", FAILING)])
def test_an_always_failing_upstream_gets_one_plus_retries_requests_per_sdk_call(
    servers: Servers, route: str, fault: dict[str, Any]
) -> None:
    tag, error = _call(servers, route, fault, max_retries=2)  # the SDK's default
    assert error.status_code == fault["status"]
    assert error.response.headers["x-should-retry"] == "false"
    assert servers.seen(servers.primary, tag) == 1 + 2  # one attempt and the route's retries
    outcome = "status_429" if fault is LIMITED else "status_5xx"
    assert wait_for(lambda: _attempts(servers, tag) == [[outcome] * 3])
    assert _advice(servers, tag) == [False]  # in the access log too


def test_with_retries_0_the_sdk_retries_after_the_upstream_s_retry_after(
    servers: Servers,
) -> None:
    tag, error = _call(servers, "alone-0", LIMITED, max_retries=2)
    assert error.status_code == 429
    assert "x-should-retry" not in error.response.headers  # the SDK's own policy applies
    assert error.response.headers["retry-after"] == "0.05"  # the upstream's, passed on
    assert servers.seen(servers.primary, tag) == 1 + 2  # the SDK's two retries, one each
    assert wait_for(lambda: _attempts(servers, tag) == [["status_429"]] * 3)
    assert _advice(servers, tag) == [None] * 3


# --- openai-node -------------------------------------------------------------------------------


def _node_call(servers: Servers, route: str, fault: dict[str, Any]) -> dict[str, Any]:
    node, tag = _installed_sdk(), uuid.uuid4().hex
    env = {
        **os.environ,
        "SLUICEGATE_BASE_URL": servers.proxy.url + "/v1",
        "MODEL": route,
        "FAULT": json.dumps(fault),
        "TAG": tag,
    }
    result = subprocess.run(
        [str(node), str(NODE_DIR / "retries.mjs")],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout), "seen": servers.seen(servers.primary, tag)}


def test_node_sdk_an_always_429_upstream_gets_one_plus_retries_requests(servers: Servers) -> None:
    got = _node_call(servers, "storm-2", LIMITED)
    assert got == {"status": 429, "should_retry": "false", "retry_after": "0.05", "seen": 3}


def test_node_sdk_an_always_503_upstream_gets_one_plus_retries_requests(servers: Servers) -> None:
    got = _node_call(servers, "storm-3", FAILING)
    assert got == {"status": 503, "should_retry": "false", "retry_after": None, "seen": 3}


def test_node_sdk_with_retries_0_retries_itself(servers: Servers) -> None:
    got = _node_call(servers, "alone-1", LIMITED)
    assert got == {"status": 429, "should_retry": None, "retry_after": "0.05", "seen": 3}
