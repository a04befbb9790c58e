"""A committed answer holds its upstream (an in-flight slot, an open response) until it is
sent or will never be, however the request ends; then it gives both back, once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.answer import Answer, Hold
from proxy.app import create_app
from proxy.config import Route, Target
from proxy.health import Health, UpstreamHealth
from proxy.latency import Latency
from proxy.mock.upstream import MockUpstream
from proxy.mock.upstream import RequestRecord as UpstreamRecord
from proxy.serving import RunningServer
from proxy.state import Runtime
from tests.helpers import wait_for

MESSAGES = [{"role": "user", "content": "还有优惠吗?"}]


class _Response:
    """Counts closes: the one thing a hold does with its response."""

    def __init__(self) -> None:
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def test_a_hold_takes_a_slot_at_once_and_gives_it_and_its_response_back_once() -> None:
    health, response = UpstreamHealth("a"), _Response()
    hold = Hold(health)
    assert health.inflight == 1  # before any request goes out: least_inflight sees it
    hold.response = response  # type: ignore[assignment]  # only aclose is called on it
    answer = Answer(Target("a", "m"), 200, [], b"", hold=hold)

    async def close_twice() -> None:
        await answer.aclose()
        await answer.aclose()

    asyncio.run(close_twice())
    assert (health.inflight, response.closed) == (0, 1)
    asyncio.run(hold.aclose())  # the round trip's own cleanup, had it run too: still once
    assert (health.inflight, response.closed) == (0, 1)


def test_an_answer_built_without_a_hold_has_nothing_to_give_back() -> None:
    asyncio.run(Answer(Target("a", "m"), 200, [], b"{}").aclose())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Health, MockUpstream]]:
    mock = MockUpstream()
    path: Path = tmp_path_factory.mktemp("answer") / "routes.yaml"
    health = Health()
    with RunningServer(mock) as upstream:
        path.write_text(
            f"upstreams:\n  up: {{base_url: '{upstream.url}/v1', cooldown: {{failures: 100}}}}\n"
            "routes:\n  - {model: bot, targets: [{upstream: up, model: m}], retries: 0}\n"
        )
        app = create_app(path, env={}, watch_interval=None, runtime=Runtime(health=health))
        with RunningServer(app) as proxy:
            yield proxy.url + "/v1/chat/completions", health, mock


def _body(seed: int, stream: bool, **knobs: Any) -> dict[str, Any]:
    return {"model": "bot", "messages": MESSAGES, "stream": stream, "seed": seed, "mock": knobs}


def _record(mock: MockUpstream, seed: int) -> UpstreamRecord:
    return next(r for r in reversed(mock.records) if r.body.get("seed") == seed)


@pytest.mark.parametrize(
    ("stream", "knobs", "status"),
    [
        (True, {}, 200),
        (False, {}, 200),
        (True, {"reset_after": 2}, 200),  # cut after commit: an error event ends it
        (True, {"status": 500}, 500),  # no answer: the upstream's own error is relayed
        (False, {"status": 400}, 400),
    ],
    ids=["stream", "whole", "reset-mid-stream", "refused-stream", "refused-whole"],
)
def test_every_way_a_request_ends_gives_the_upstream_slot_back(
    stack: tuple[str, Health, MockUpstream], stream: bool, knobs: dict[str, Any], status: int
) -> None:
    url, health, _ = stack
    before = health["up"].inflight  # 0, unless an earlier case leaked: then that case fails
    response = httpx.post(url, json=_body(11, stream, **knobs), timeout=10)
    assert response.status_code == status
    assert wait_for(lambda: health["up"].inflight == before, 5), health["up"].inflight


def test_a_streaming_answer_holds_its_slot_until_the_client_leaves(
    stack: tuple[str, Health, MockUpstream],
) -> None:
    url, health, mock = stack
    before = health["up"].inflight
    with httpx.stream("POST", url, json=_body(12, True, pause_after_first=30.0), timeout=10) as r:
        chunks = r.iter_raw()  # kept: a dropped iterator closes the response
        next(chunks)  # committed and relaying: the answer holds the slot
        assert health["up"].inflight == before + 1
    record = _record(mock, 12)
    assert wait_for(lambda: record.disconnected is not None, 5), "upstream was not closed"
    assert wait_for(lambda: health["up"].inflight == before, 5), health["up"].inflight
    assert record.finished is None


def test_a_client_that_leaves_before_the_answer_commits_frees_the_slot(
    stack: tuple[str, Health, MockUpstream],
) -> None:
    url, health, mock = stack
    before = health["up"].inflight
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=_body(13, True, ttft=30.0, keepalives=100), timeout=0.5)
    record = _record(mock, 13)
    assert wait_for(lambda: record.disconnected is not None, 5), "upstream was not closed"
    assert wait_for(lambda: health["up"].inflight == before, 5), health["up"].inflight


class _BrokenLatency(Latency):
    """A bookkeeping bug right after a commit: the one way left to lose a committed answer."""

    def record(self, route: Route, target: Target, seconds: float, size: float, now: float) -> None:
        raise RuntimeError("bookkeeping failed")


def test_a_failure_right_after_the_commit_still_gives_the_answer_back(tmp_path: Path) -> None:
    health, mock = Health(), MockUpstream()
    path = tmp_path / "routes.yaml"
    with RunningServer(mock) as upstream:
        path.write_text(
            f"upstreams:\n  up: {{base_url: '{upstream.url}/v1'}}\n"
            "routes:\n  - {model: bot, targets: [{upstream: up, model: m}], retries: 0}\n"
        )
        runtime = Runtime(health=health, latency=_BrokenLatency())
        app = create_app(path, env={}, watch_interval=None, runtime=runtime)
        with RunningServer(app) as proxy:
            url = proxy.url + "/v1/chat/completions"
            response = httpx.post(url, json=_body(21, True, pause_after_first=30.0), timeout=10)
            assert response.status_code == 500  # the bug answers in OpenAI's shape...
            assert response.json()["error"]["code"] == "internal_error"
            # ...and the committed answer is closed: slot back, upstream connection gone.
            assert wait_for(lambda: health["up"].inflight == 0, 5), health["up"].inflight
            assert wait_for(lambda: _record(mock, 21).disconnected is not None, 5)
