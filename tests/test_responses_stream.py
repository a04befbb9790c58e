"""The Responses API's streams: which events are first content (a table), the metering tee
cut at every byte of a small stream, byte-exact relay through a real proxy (split events,
CRLF framing), and usage and cost exact against the mock's own counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.metering.tee import WatchResponses
from proxy.mock.knobs import Knobs
from proxy.mock.responses import plan_response
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord, Usage
from proxy.serving import RunningServer
from proxy.sse import Kind, parse_responses
from tests.helpers import wait_for


def _event(payload: dict[str, Any]) -> bytes:
    kind = str(payload.get("type", "message")).encode()
    return b"event: " + kind + b"\ndata: " + orjson.dumps(payload)


FUNCTION_ITEM = {"type": "function_call", "id": "fc_1", "name": "f", "arguments": ""}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"type": "response.created", "response": {"id": "r", "error": None}}, "other"),
        ({"type": "response.in_progress", "response": {}}, "other"),
        ({"type": "response.output_item.added", "item": {"type": "message"}}, "other"),
        ({"type": "response.output_item.added", "item": {"type": "reasoning"}}, "other"),
        ({"type": "response.content_part.added", "part": {"text": ""}}, "other"),
        ({"type": "response.output_text.delta", "delta": ""}, "other"),
        ({"type": "response.output_text.delta", "delta": "Hi"}, "content"),
        ({"type": "response.refusal.delta", "delta": "No"}, "content"),
        ({"type": "response.reasoning_summary_text.delta", "delta": "So"}, "content"),
        ({"type": "response.reasoning_text.delta", "delta": "So"}, "content"),
        ({"type": "response.function_call_arguments.delta", "delta": "{"}, "content"),
        ({"type": "response.output_item.added", "item": FUNCTION_ITEM}, "content"),
        ({"type": "response.output_text.done", "text": ""}, "content"),
        ({"type": "response.output_item.done", "item": {"type": "message"}}, "content"),
        ({"type": "response.completed", "response": {}}, "content"),
        ({"type": "response.incomplete", "response": {}}, "content"),
        ({"type": "response.failed", "response": {}}, "error"),
        ({"type": "error", "code": "server_error", "message": "x"}, "error"),
        ({"error": {"message": "overloaded"}}, "error"),
        ({"type": ["odd"]}, "other"),
    ],
)
def test_what_counts_as_first_content(payload: dict[str, Any], kind: Kind) -> None:
    assert parse_responses(_event(payload))[0] == kind


def test_comments_are_not_content() -> None:
    assert parse_responses(b": keep-alive") == ("other", None)


SMALL = plan_response({"input": "hi", "stream": True}, Knobs(tokens=2, reasoning=1))
STREAM = b"".join((
    (ev := SMALL.events()).role, *ev.content, ev.final, ev.completed,
))  # fmt: skip
USAGE = Usage(input=SMALL.prompt_tokens, output=2, reasoning=1)
MARKER = b'.delta"'
MARKS = [i for i in range(len(STREAM)) if STREAM.startswith(MARKER, i)]


def test_the_tee_relays_every_byte_and_finds_the_usage_however_the_stream_is_cut() -> None:
    """Every split position of a small stream, one cut and two cuts a few bytes apart."""
    for at in range(len(STREAM) + 1):
        for then in {at, min(at + 7, len(STREAM))}:
            tee = WatchResponses()
            out = b"".join(tee.feed(p) for p in (STREAM[:at], STREAM[at:then], STREAM[then:]) if p)
            assert out + tee.end() == STREAM
            assert tee.usage() == USAGE, at
            # One reasoning and two text deltas, counted by a marker in each chunk (an
            # estimate's measure only: a marker cut in two is not counted, as for chat).
            inside = sum(0 < cut - m < len(MARKER) for cut in {at, then} for m in MARKS)
            assert tee.events == 3 - inside


ROUTES = """\
upstreams:
  mock: {{base_url: "{mock}/v1"}}
routes:
  - model: bot
    targets: [{{upstream: mock, model: mock-r}}]
pricing:
  mock-r: {{input: 2.0, cached_input: 0.5, output: 8.0}}
"""


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MockUpstream, RunningServer, RunningServer, list[RequestRecord]]]:
    mock, records = MockUpstream(faults=True), []
    path = Path(tmp_path_factory.mktemp("rstream")) / "routes.yaml"
    with RunningServer(mock) as upstream:
        path.write_text(ROUTES.format(mock=upstream.url))
        app = create_app(path, env={}, watch_interval=None, observers=(records.append,))
        with RunningServer(app) as proxy:
            yield mock, upstream, proxy, records


@pytest.mark.parametrize(
    "knobs",
    [{}, {"split_utf8": True}, {"newline": "crlf"}, {"reasoning": 3, "keepalives": 2}],
    ids=["plain", "split-events", "crlf", "reasoning-and-keepalives"],
)
def test_the_stream_is_relayed_byte_for_byte(
    setup: tuple[MockUpstream, RunningServer, RunningServer, list[RequestRecord]],
    knobs: dict[str, Any],
) -> None:
    _, upstream, proxy, _ = setup
    body = {"input": "双十一预售?", "stream": True, "seed": 4, "mock": {"tokens": 5, **knobs}}
    direct = httpx.post(upstream.url + "/v1/responses", json={**body, "model": "mock-r"})
    proxied = httpx.post(proxy.url + "/v1/responses", json={**body, "model": "bot"})
    assert proxied.status_code == 200
    assert proxied.headers["content-type"].startswith("text/event-stream")
    # keep-alive comments the upstream sent before its first event are relayed too
    assert proxied.content == direct.content


@pytest.mark.parametrize("stream", [False, True])
def test_usage_tokens_and_cost_are_the_upstreams_own(
    setup: tuple[MockUpstream, RunningServer, RunningServer, list[RequestRecord]],
    stream: bool,
) -> None:
    mock, _, proxy, records = setup
    body = {
        "model": "bot",
        "input": [{"role": "user", "content": "what is on sale today"}],
        "instructions": "be brief",
        "stream": stream,
        "mock": {"tokens": 6, "reasoning": 2, "cached_tokens": 3},
    }
    seen = len(records)
    answer = httpx.post(proxy.url + "/v1/responses", json=body, timeout=10)
    assert answer.status_code == 200
    assert wait_for(lambda: len(records) > seen)
    sent = mock.records[-1]
    record = records[-1]
    assert record.api == "responses"
    assert record.usage == Usage(
        input=sent.prompt_tokens - 3, cached_input=3, output=6, reasoning=2
    )
    assert sent.completion_tokens == 8
    assert record.cost_usd == pytest.approx(
        ((sent.prompt_tokens - 3) * 2.0 + 3 * 0.5 + 8 * 8.0) / 1e6
    )
    assert record.ttft_s is not None


def test_a_cut_stream_is_estimated_from_its_deltas(
    setup: tuple[MockUpstream, RunningServer, RunningServer, list[RequestRecord]],
) -> None:
    _, _, proxy, records = setup
    body = {"model": "bot", "input": "hi", "stream": True, "fault": {"reset_after": 4}}
    seen = len(records)
    answer = httpx.post(proxy.url + "/v1/responses", json=body, timeout=10)
    assert b"event: error" in answer.content
    assert wait_for(lambda: len(records) > seen)
    usage = records[-1].usage
    assert usage is not None
    assert usage.source == "estimated"
    assert usage.output == 4  # the deltas relayed before the cut
    assert usage.input > 0
    assert records[-1].stream_error == "reset"
