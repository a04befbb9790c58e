"""DeepSeek's stream shape (tests/fixtures/providers/deepseek-*): keep-alive comments while
queued, `reasoning_content` deltas before `content`, cache hits in its own usage fields."""

from __future__ import annotations

import pytest

from proxy.record import Usage
from tests.helpers import wait_for
from tests.provider_shapes import FIRST_TOKEN_TIMEOUT, PAUSE, Shapes, cost, recording

USAGE = Usage(input=8, cached_input=32, output=9, reasoning=12)


def test_relay_is_byte_exact(shapes: Shapes) -> None:
    response, raw, record = shapes.post("deepseek")
    assert response.status_code == 200
    assert raw == recording("deepseek")
    assert raw.startswith(b": keep-alive\n\n: keep-alive\n\ndata: {")
    assert record.status == 200


def test_usage_prices_cache_hits_as_cached_input(shapes: Shapes) -> None:
    _, _, record = shapes.post("deepseek")
    assert record.usage == USAGE
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_sdk_reads_reasoning_then_content(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("deepseek")
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "用户问双十一的优惠。"
    assert "".join(d.content or "" for d in deltas) == "满300减50 🛒"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 40


def test_a_reasoning_delta_is_the_first_token(shapes: Shapes) -> None:
    # Events: 2 keep-alives, the role chunk, then reasoning. Silence after the first
    # reasoning delta: the proxy has committed, so the deadline no longer applies.
    assert PAUSE > FIRST_TOKEN_TIMEOUT
    assert shapes.paused("deepseek", 4) == (200, recording("deepseek"))


def test_keepalives_and_the_role_chunk_are_not_the_first_token(shapes: Shapes) -> None:
    response, _, record = shapes.post(
        "deepseek", route="hurried", replay_pause_at=3, pause_after_first=PAUSE
    )
    assert response.status_code == 504
    assert {a.outcome for a in record.attempts} == {"first_token_timeout"}


def test_usage_is_metered_when_the_client_did_not_ask(shapes: Shapes) -> None:
    # DeepSeek accepts stream_options; it puts usage on its finish chunk, which is not a
    # usage-only event, so the client's bytes stay whole.
    _, raw, record = shapes.post("deepseek", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == recording("deepseek")
    assert record.usage == USAGE


def test_non_stream_body_is_byte_exact_and_priced(shapes: Shapes) -> None:
    seen = len(shapes.finished)
    got = shapes.client().chat.completions.with_raw_response.create(
        model="shape",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"mock": {"replay": "deepseek"}},
    )
    assert got.http_response.content == recording("deepseek", stream=False)
    assert got.parse().choices[0].message.content == "满300减50 🛒"
    assert wait_for(lambda: len(shapes.finished) > seen)
    assert shapes.finished[seen].usage == USAGE
