"""Anthropic's OpenAI SDK compatibility shape (tests/fixtures/providers/anthropic-*): a
role-only first chunk, `stream_options` honoured (a usage chunk with `choices: []`), and the
fields its documentation calls "always empty" (usage details, `service_tier`,
`system_fingerprint`, `logprobs`, `refusal`) sent as null."""

from __future__ import annotations

import orjson
import pytest

from proxy.record import Usage
from tests.provider_shapes import MESSAGES, Shapes, cost, recording, without_usage_event

USAGE = Usage(input=14, output=9)
BODY_USAGE = Usage(input=352, output=41)
# Extended thinking as Anthropic documents it for the OpenAI SDK: an extra body field.
THINKING = {"type": "enabled", "budget_tokens": 2000}


def test_relay_is_byte_exact_and_priced(shapes: Shapes) -> None:
    response, raw, record = shapes.post("anthropic")
    assert response.status_code == 200
    assert raw == recording("anthropic")
    assert record.usage == USAGE  # null usage details: nothing cached, nothing reasoned
    assert record.cost_usd == pytest.approx(cost(USAGE), abs=1e-15)


def test_the_role_chunk_is_not_the_first_token_the_first_text_is(shapes: Shapes) -> None:
    assert shapes.paused("anthropic", 1)[0] == 504  # role, content ""
    assert shapes.paused("anthropic", 2) == (200, recording("anthropic"))


def test_usage_chunk_the_client_did_not_ask_for_is_taken_out(shapes: Shapes) -> None:
    # stream_options is "fully supported": `auto` asks for usage and drops its chunk.
    _, raw, record = shapes.post("anthropic", options=None)
    assert shapes.upstream_body()["stream_options"] == {"include_usage": True}
    assert raw == without_usage_event(recording("anthropic"))
    assert raw.endswith(b"data: [DONE]\n\n")
    assert record.usage == USAGE


def test_sdk_reads_the_text_and_the_empty_fields(shapes: Shapes) -> None:
    chunks = shapes.sdk_stream("anthropic")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "双十一 has deals 🛒"
    )
    assert chunks[0].system_fingerprint is None
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (14, 9)
    assert usage.prompt_tokens_details is None


def test_thinking_and_the_key_reach_the_upstream_as_anthropic_expects(shapes: Shapes) -> None:
    list(
        shapes.client().chat.completions.create(
            model="shape",
            messages=MESSAGES,
            stream=True,
            extra_body={"mock": {"replay": "anthropic"}, "thinking": THINKING},
        )
    )
    assert shapes.upstream_body()["thinking"] == THINKING
    assert shapes.mock.records[-1].headers["authorization"] == "Bearer sk-shapes"


def test_non_stream_tool_call_is_byte_exact_and_priced(shapes: Shapes) -> None:
    got = shapes.client().chat.completions.with_raw_response.create(
        model="shape", messages=MESSAGES, extra_body={"mock": {"replay": "anthropic"}}
    )
    assert got.http_response.content == recording("anthropic", stream=False)
    call = got.parse().choices[0].message.tool_calls[0]
    assert orjson.loads(call.function.arguments) == {"event": "双十一"}
    record = shapes.record_of(got.http_response.headers["x-request-id"])
    assert record.usage == BODY_USAGE
    assert record.cost_usd == pytest.approx(cost(BODY_USAGE), abs=1e-15)
