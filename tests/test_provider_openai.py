"""OpenAI's stream shapes (tests/fixtures/providers/openai-*): `obfuscation`, `service_tier`
and `system_fingerprint` on each chunk, the usage chunk with `choices: []`, a tool call's
arguments split across chunks, and refusal deltas."""

from __future__ import annotations

import orjson
import pytest

from proxy.record import Usage
from tests.provider_shapes import Shapes, cost, recording, without_usage_event

TOOLS_USAGE = Usage(input=61, output=18)
REFUSAL_USAGE = Usage(input=166, cached_input=1152, output=9)


@pytest.mark.parametrize(
    ("name", "usage"), [("openai-tools", TOOLS_USAGE), ("openai-refusal", REFUSAL_USAGE)]
)
def test_relay_is_byte_exact_and_priced(shapes: Shapes, name: str, usage: Usage) -> None:
    response, raw, record = shapes.post(name)
    assert response.status_code == 200
    assert raw == recording(name)
    assert record.usage == usage
    assert record.cost_usd == pytest.approx(cost(usage), abs=1e-15)


def test_sdk_assembles_the_split_tool_call(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("openai-tools")
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "call_Qk2pT8yR1vLmN0aZ"
    assert orjson.loads("".join(t.function.arguments or "" for t in calls if t.function)) == {
        "event": "双十一"
    }
    assert chunks[0].service_tier == "default"
    assert chunks[0].system_fingerprint == "fp_07871e2ad8"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None


def test_sdk_reads_the_refusal(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("openai-refusal")
    refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    assert refusal == "I'm sorry, I can't help with that."


def test_a_tool_call_is_the_first_token_an_empty_refusal_is_not(shapes: Shapes) -> None:
    assert shapes.paused("openai-tools", 1) == (200, recording("openai-tools"))
    assert shapes.paused("openai-refusal", 1)[0] == 504  # role, content null, refusal ""
    assert shapes.paused("openai-refusal", 2) == (200, recording("openai-refusal"))


def test_usage_chunk_the_client_did_not_ask_for_is_taken_out(shapes: Shapes) -> None:
    _, raw, record = shapes.post("openai-refusal", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == without_usage_event(recording("openai-refusal"))
    assert b'"obfuscation"' in raw  # every other chunk is passed as it came
    assert record.usage == REFUSAL_USAGE
