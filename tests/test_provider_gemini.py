"""Gemini's OpenAI-compatible stream shape (tests/fixtures/providers/gemini-stream.sse): no
role-only chunk, and running usage (thinking tokens inside) on every chunk, counted once."""

from __future__ import annotations

import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording

USAGE = Usage(input=12, output=7, reasoning=12)  # the last chunk's: 19 completion tokens


def test_relay_is_byte_exact_and_usage_counted_once(shapes: Shapes) -> None:
    response, raw, record = shapes.post("gemini")
    assert response.status_code == 200
    assert raw == recording("gemini")
    assert record.usage == USAGE
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_the_first_chunk_is_the_first_token(shapes: Shapes) -> None:
    assert shapes.paused("gemini", 1) == (200, recording("gemini"))


def test_usage_metered_when_the_client_did_not_ask(shapes: Shapes) -> None:
    # Gemini accepts stream_options; with no usage-only chunk, nothing is taken out.
    _, raw, record = shapes.post("gemini", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == recording("gemini")
    assert record.usage == USAGE


def test_sdk_reads_the_text(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("gemini")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "双十一 has deals 🛒"
    assert chunks[-1].choices[0].finish_reason == "stop"
