"""Ollama's stream shape (tests/fixtures/providers/ollama-stream.sse): the role on every delta,
a whole tool call in one chunk, and the usage chunk that include_usage asks for."""

from __future__ import annotations

import orjson
import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording, without_usage_event

USAGE = Usage(input=52, output=27)


def test_relay_is_byte_exact_and_priced(shapes: Shapes) -> None:
    response, raw, record = shapes.post("ollama")
    assert response.status_code == 200
    assert raw == recording("ollama")
    assert record.usage == USAGE
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_the_first_chunk_is_the_first_token(shapes: Shapes) -> None:
    assert shapes.paused("ollama", 1) == (200, recording("ollama"))


def test_usage_chunk_the_client_did_not_ask_for_is_taken_out(shapes: Shapes) -> None:
    _, raw, record = shapes.post("ollama", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == without_usage_event(recording("ollama"))
    assert record.usage == USAGE


def test_sdk_reads_text_and_the_whole_tool_call(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("ollama")
    assert chunks[0].choices[0].delta.content == "双十一"
    call = chunks[1].choices[0].delta.tool_calls
    assert call is not None
    assert call[0].function is not None
    assert orjson.loads(call[0].function.arguments or "") == {"event": "双十一"}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 79
