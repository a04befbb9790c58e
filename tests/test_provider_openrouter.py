"""OpenRouter's stream shape (tests/fixtures/providers/openrouter-stream.sse):
`: OPENROUTER PROCESSING` comments while routing, a role chunk with empty content, and a
usage chunk with `choices: []` that carries OpenRouter's own `cost`."""

from __future__ import annotations

import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording, without_usage_event

USAGE = Usage(input=15, output=5)


def test_relay_is_byte_exact_and_priced_from_tokens(shapes: Shapes) -> None:
    response, raw, record = shapes.post("openrouter")
    assert response.status_code == 200
    assert raw == recording("openrouter")
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\ndata: {")
    assert record.usage == USAGE
    # The configured price, not OpenRouter's `cost` field (5.25e-06 in the recording).
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_processing_comments_and_the_role_chunk_are_not_the_first_token(shapes: Shapes) -> None:
    assert shapes.paused("openrouter", 3)[0] == 504
    assert shapes.paused("openrouter", 4) == (200, recording("openrouter"))


def test_usage_chunk_the_client_did_not_ask_for_is_taken_out(shapes: Shapes) -> None:
    _, raw, record = shapes.post("openrouter", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == without_usage_event(recording("openrouter"))
    assert record.usage == USAGE


def test_sdk_reads_past_the_comments(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("openrouter")
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "双十一 sale 🎁"
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 20
