"""The mock upstream's answers as bytes: deterministic tokens, SSE events, JSON bodies.

Pure functions with no I/O, so the server module only schedules writes. Stream events are
assembled by concatenating pre-encoded fragments (one template per request, one pre-encoded
JSON string per vocabulary entry): no per-token JSON encoding on the hot path.
"""

from __future__ import annotations

import gzip
import itertools
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from proxy.errors import error_body

CREATED = 1700000000
MODELS = ("mock-gpt-4o", "mock-gpt-4o-mini")

# ASCII words carry their leading space as real tokenizers do; the rest are 2-, 3- and 4-byte
# UTF-8 so every answer exercises multibyte characters split across writes and reads.
ASCII_WORDS = (" the", " deal", " price", " order", " cart", " ships", " today", " sale")
MULTIBYTE = ("你好", "双十一", "优惠", "购物车", "🛒", "🎉", " café", "限时🎁", "秒杀")
VOCAB = ASCII_WORDS + MULTIBYTE
_VOCAB_JSON = {tok: orjson.dumps(tok) for tok in VOCAB}


def draw_tokens(seed: int, tokens: int) -> tuple[str, ...]:
    """The first `tokens` tokens for `seed`; a shorter answer is always a prefix of a longer one."""
    return _draw(seed, tokens)


@lru_cache(maxsize=256)
def _draw(seed: int, tokens: int) -> tuple[str, ...]:
    if tokens <= 0:
        return ()
    rng = random.Random(seed)
    # The first token is always multibyte so that even a 1-token answer tests UTF-8 handling.
    first = rng.choice(MULTIBYTE)
    return (first, *rng.choices(VOCAB, k=tokens - 1))


def expected_content(seed: int, tokens: int) -> str:
    """The exact assistant text the mock answers for `seed` with `tokens` content tokens."""
    return "".join(draw_tokens(seed, tokens))


# A CJK ideograph (or kana/hangul) counts as one token; any other non-space run as one word.
_UNITS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
    r"|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+"
)


def count_text_tokens(text: str) -> int:
    return len(_UNITS.findall(text))


def count_input_tokens(value: Any) -> int:
    """A completions `prompt` or embeddings `input`: text, texts, or token-id arrays."""
    if isinstance(value, str):
        return count_text_tokens(value)
    if not isinstance(value, list):
        return 0
    if value and all(isinstance(t, int) for t in value):
        return len(value)
    return sum(count_text_tokens(p) if isinstance(p, str) else len(p) for p in value)


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Deterministic stand-in for a tokenizer: 4 per message plus words and CJK characters."""
    total = 0
    for message in messages:
        total += 4
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(_UNITS.findall(content))
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    total += len(_UNITS.findall(text))
    return total


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@lru_cache(maxsize=256)
def completion_body(seed: int, model: str, tokens: int, finish: str, prompt_tokens: int) -> bytes:
    """The whole non-streaming `chat.completion` JSON body."""
    return orjson.dumps(
        {
            "id": f"chatcmpl-mock-{seed}",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": expected_content(seed, tokens)},
                    "finish_reason": finish,
                }
            ],
            "usage": usage(prompt_tokens, tokens),
        }
    )


@lru_cache(maxsize=256)
def text_completion_body(
    seed: int, model: str, tokens: int, finish: str, prompt_tokens: int
) -> bytes:
    """The whole non-streaming body of the completions API (`text_completion`)."""
    choice = {"text": expected_content(seed, tokens), "index": 0, "logprobs": None}
    return orjson.dumps(
        {
            "id": f"cmpl-mock-{seed}",
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "choices": [{**choice, "finish_reason": finish}],
            "usage": usage(prompt_tokens, tokens),
        }
    )


EMBEDDING_DIMENSIONS = 8


def embeddings_body(seed: int, model: str, inputs: int, prompt_tokens: int) -> bytes:
    """The embeddings API's body: one deterministic vector per input."""
    rng = random.Random(seed)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(EMBEDDING_DIMENSIONS)],
        }
        for i in range(inputs)
    ]
    used = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": used})


@dataclass(frozen=True, slots=True)
class StreamEvents:
    """Every SSE event of one streamed answer, each a complete `data: ...\\n\\n` frame."""

    role: bytes
    content: tuple[bytes, ...]
    final: bytes
    usage_head: bytes | None  # the usage chunk up to its usage object, when include_usage is set
    done: bytes = b"data: [DONE]\n\n"

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        assert self.usage_head is not None
        return self.usage_head + orjson.dumps(usage(prompt_tokens, completion_tokens)) + b"}\n\n"


@lru_cache(maxsize=64)
def stream_events(
    seed: int, model: str, tokens: int, finish: str, include_usage: bool
) -> StreamEvents:
    # Key order matches OpenAI's chunks and orjson's output of the equivalent dict, so these
    # frames are byte-identical to `b"data: " + orjson.dumps(chunk) + b"\n\n"`.
    head = (
        b'data: {"id":"chatcmpl-mock-%d","object":"chat.completion.chunk","created":%d,"model":%s,'
        % (seed, CREATED, orjson.dumps(model))
    )
    choice = head + b'"choices":[{"index":0,"delta":'
    tail = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
    return StreamEvents(
        role=choice + b'{"role":"assistant","content":""},"finish_reason":null' + tail,
        content=tuple(
            choice + b'{"content":' + _VOCAB_JSON[tok] + b'},"finish_reason":null' + tail
            for tok in draw_tokens(seed, tokens)
        ),
        final=choice + b'{},"finish_reason":"' + finish.encode() + b'"' + tail,
        usage_head=head + b'"choices":[],"usage":' if include_usage else None,
    )


@lru_cache(maxsize=64)
def text_stream_events(
    seed: int, model: str, tokens: int, finish: str, include_usage: bool
) -> StreamEvents:
    """The completions API's stream: `text_completion` chunks, no role event."""
    head = b'data: {"id":"cmpl-mock-%d","object":"text_completion","created":%d,"model":%s,' % (
        seed,
        CREATED,
        orjson.dumps(model),
    )
    choice = head + b'"choices":[{"text":'
    tail = b',"index":0,"logprobs":null,"finish_reason":'
    end = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
    return StreamEvents(
        role=b"",
        content=tuple(
            choice + _VOCAB_JSON[tok] + tail + b"null" + end for tok in draw_tokens(seed, tokens)
        ),
        final=choice + b'""' + tail + b'"' + finish.encode() + b'"' + end,
        usage_head=head + b'"choices":[],"usage":' if include_usage else None,
    )


# Knob `newline`: the line ending an upstream frames its SSE with. Servers behind Java and .NET
# stacks write CRLF; a lone CR is legal SSE too.
NEWLINES = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def frame(event: bytes, newline: bytes) -> bytes:
    """An LF-framed event with every line ending written as `newline`: the JSON inside
    never holds a raw LF (orjson escapes it), so each LF is a line ending."""
    return event if newline == b"\n" else event.replace(b"\n", newline)


def cut_mid_event(event: bytes) -> bytes:
    """An LF-framed event without the line ending that would end it (knob
    `reset_mid_event`): its data line is whole, the blank line after it never comes."""
    return event[:-1]


@lru_cache(maxsize=4096)
def split_event(event: bytes) -> tuple[bytes, ...]:
    """Cut one event into pieces at odd offsets: after the first byte, between the two newlines
    that end it, in the middle, and one byte into every multibyte UTF-8 character."""
    cuts = {1, len(event) // 2 | 1, len(event) - 1}
    cuts.update(i + 1 for i, byte in enumerate(event) if byte >= 0xC0)  # lead bytes
    edges = [0, *sorted(c for c in cuts if 0 < c < len(event)), len(event)]
    return tuple(event[a:b] for a, b in itertools.pairwise(edges))


class Invalid(Exception):
    """A request the mock refuses with a 400, naming the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def body(self) -> bytes:
        return error_body(self.message, "invalid_request_error", param=self.param)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request asks for, once validated."""

    seed: int
    model: str
    tokens: int  # after max_tokens capping
    finish: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    api: str = "chat"  # chat, completions, embeddings
    inputs: int = 1  # embeddings: how many vectors


def _int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Invalid(f"Invalid '{name}': expected a non-negative integer", name)
    return value


def seed_and_model(body: dict[str, Any]) -> tuple[int, str]:
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise Invalid("Invalid 'seed': expected an integer", "seed")
    model = body.get("model", MODELS[0])
    if not isinstance(model, str):
        raise Invalid("Invalid 'model': expected a string", "model")
    return seed, model


def plan_request(body: dict[str, Any], tokens: int, api: str = "chat") -> Plan:
    seed, model = seed_and_model(body)
    field = {"chat": "messages", "completions": "prompt", "embeddings": "input"}[api]
    prompt = body.get(field) or []
    if not isinstance(prompt, list) and not (api != "chat" and isinstance(prompt, str)):
        raise Invalid(f"Invalid '{field}': expected an array", field)
    caps = [_int_param(body, "max_tokens"), _int_param(body, "max_completion_tokens")]
    capped = min([tokens, *(c for c in caps if c is not None)])
    options = body.get("stream_options")
    if isinstance(prompt, list) and api == "chat":
        prompt_tokens = count_prompt_tokens(prompt)
    else:
        prompt_tokens = count_input_tokens(prompt)
    several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    return Plan(
        seed=seed,
        model=model,
        tokens=capped,
        finish="length" if capped < tokens else "stop",
        stream=body.get("stream") is True and api != "embeddings",
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        prompt_tokens=prompt_tokens,
        api=api,
        inputs=len(prompt) if several else 1,
    )


# OpenAI's error `type`/`code` for the statuses people usually inject.
_ERROR_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def injected_error_body(status: int, echo: str | None = None, form: str = "plain") -> bytes:
    """`echo` (knob `echo_auth`): the Authorization header received, quoted back in the
    message as some upstreams' 401s do, in the JSON spelling `form` (knob `echo_form`)."""
    default = ("invalid_request_error" if status < 500 else "server_error", None)
    type_, code = _ERROR_KINDS.get(status, default)
    message = f"Mock upstream error (status {status})"
    if echo is None:
        return error_body(message, type_, code=code)
    quoted = echo[:-3] if form == "truncated" else echo
    body = error_body(message + f": credentials not accepted: '{quoted}'", type_, code=code)
    return body.replace(quoted.encode(), echoed(quoted, form).encode())


# Knob `echo_form`: how an echoed Authorization header is spelt. JSON may escape any
# character as \u00XX and "/" as \/; `truncated` quotes all but its last 3 characters.
ECHO_FORMS = ("plain", "unicode", "slash", "truncated")


def echoed(text: str, form: str) -> str:
    if form == "unicode":
        return "".join(f"\\u{ord(c):04x}" for c in text)
    return text.replace("/", "\\/") if form == "slash" else text


# Knob `preamble`: bytes a stream sends before its first event, in 256 KiB writes, each
# ending mid-line: keep-alive comments, or one event that ends only after all of them.
PREAMBLES = ("comments", "event")
PREAMBLE_WRITE = 256 * 1024


def preamble_writes(size: int, kind: str) -> list[bytes]:
    """At least `size` bytes as writes of `PREAMBLE_WRITE` (the last ends the event)."""
    count = -(-size // PREAMBLE_WRITE)
    unit = b": keep-alive\n\n" if kind == "comments" else b"x"
    block = (b": " if kind == "comments" else b"data: ") + unit * (PREAMBLE_WRITE // len(unit) + 1)
    return [block[:PREAMBLE_WRITE]] * count + [b"\n\n"]


# Knob `encoding`: a body sent whole, compressed although the proxy asks for identity. `br`
# only labels the body (no brotli here): the proxy must not relay what it cannot read.
ENCODINGS = ("identity", "gzip", "deflate", "br")


def encoded(body: bytes, encoding: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body as sent in `encoding`, and the content-encoding header that says so."""
    if encoding == "identity":
        return body, []
    if encoding != "br":
        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    return body, [(b"content-encoding", encoding.encode())]


def echo_headers(echo: str | None) -> list[tuple[bytes, bytes]]:
    """The Authorization header received, quoted back in WWW-Authenticate (`echo_auth`)."""
    if echo is None:
        return []
    described = f'Bearer error="invalid_token", error_description="not accepted: {echo}"'
    return [(b"www-authenticate", described.encode("latin-1"))]


# Knob `hostile_headers`: what no client of the proxy may see from an upstream (server
# directives, a redirect, a CORS grant); each is dropped by the proxy's allowlist.
HOSTILE_HEADERS = (
    (b"x-accel-redirect", b"/internal/secrets"),
    (b"x-sendfile", b"/etc/passwd"),
    (b"access-control-allow-origin", b"*"),
    (b"location", b"https://evil.test/"),
    (b"refresh", b"0; url=https://evil.test/"),
)

# Knob `set_cookie`: what a CDN in front of an upstream adds to every answer.
COOKIE_HEADERS = (
    (b"set-cookie", b"__cf_bm=mock-session-7f3a; path=/; HttpOnly; Secure"),
    (b"keep-alive", b"timeout=5, max=100"),  # hop-by-hop: ends at the proxy
)
