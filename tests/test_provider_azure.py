"""Azure OpenAI's stream shape (tests/fixtures/providers/azure-stream.sse): a first chunk with
`choices: []` and `prompt_filter_results`, `content_filter_results` on every choice."""

from __future__ import annotations

import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording, without_usage_event

USAGE = Usage(input=19, output=4)


def test_relay_is_byte_exact_and_priced(shapes: Shapes) -> None:
    response, raw, record = shapes.post("azure")
    assert response.status_code == 200
    assert raw == recording("azure")
    assert record.usage == USAGE
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_prompt_filter_and_role_chunks_are_not_the_first_token(shapes: Shapes) -> None:
    assert shapes.paused("azure", 2)[0] == 504  # prompt filter results, then the role chunk
    assert shapes.paused("azure", 3) == (200, recording("azure"))  # after the first text


def test_sdk_reads_past_the_prompt_filter_chunk(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("azure")
    assert chunks[0].choices == []
    assert chunks[0].model_extra is not None
    assert chunks[0].model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "双十一 deals"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 23


def test_usage_the_client_did_not_ask_for_is_metered_and_taken_out(shapes: Shapes) -> None:
    _, raw, record = shapes.post("azure", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == without_usage_event(recording("azure"))
    assert raw.startswith(b'data: {"choices":[],"created":0,"id":"","model":""')  # kept
    assert record.usage == USAGE
