"""vLLM's stream shape with `continuous_usage_stats` (tests/fixtures/providers/vllm-stream.sse):
running usage on every chunk, the role chunk included, counted once and never summed."""

from __future__ import annotations

import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording, without_usage_event

USAGE = Usage(input=24, output=4)  # the last running totals; summed they would be 7 times more
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def test_relay_is_byte_exact_and_usage_counted_once(shapes: Shapes) -> None:
    response, raw, record = shapes.post("vllm", options=CONTINUOUS)
    assert response.status_code == 200
    assert raw == recording("vllm")
    assert raw.count(b'"usage":{') == 6
    assert record.usage == USAGE
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_a_role_chunk_with_running_usage_is_not_the_first_token(shapes: Shapes) -> None:
    assert shapes.paused("vllm", 1)[0] == 504
    assert shapes.paused("vllm", 2) == (200, recording("vllm"))


def test_continuous_usage_kept_and_usage_only_chunk_taken_out(shapes: Shapes) -> None:
    # The client asked for running usage but not for the usage chunk: the proxy asks for
    # both (vLLM accepts stream_options) and takes out only the chunk it added.
    _, raw, record = shapes.post("vllm", options={"continuous_usage_stats": True})
    assert shapes.upstream_body()["stream_options"] == CONTINUOUS
    assert raw == without_usage_event(recording("vllm"))
    assert raw.count(b'"usage":{') == 5
    assert record.usage == USAGE


def test_sdk_reads_usage_on_every_chunk(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("vllm")
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [0, 1, 2, 3, 4, 4]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "双十一优惠 🎉"
