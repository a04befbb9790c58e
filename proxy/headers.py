"""Header hygiene at both boundaries (pure).

Both boundaries are allowlists. Upstream requests carry the client's `accept`,
`user-agent` and `openai-beta` only: never its credentials, cookies or hop-by-hop headers.
Client responses carry only the upstream headers an OpenAI client reads (docs/BEHAVIOUR.md):
never an upstream's cookies, redirects, CORS grants or server directives (`X-Accel-Redirect`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Client headers that may travel upstream. Authorization is replaced by the upstream's
# own key; everything else (cookies, x-stainless-*, organisation ids) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"accept", b"user-agent", b"openai-beta"})

# Upstream response headers that reach the client, by exact name or by prefix; the proxy's
# own x-request-id replaces the upstream's, and the body is re-framed (no length, encoding).
RELAYED_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"retry-after", b"retry-after-ms", b"x-should-retry"}
)
RELAYED_RESPONSE_PREFIXES = (b"openai-", b"x-ratelimit-")

SSE_HEADERS: Headers = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

_MAX_REQUEST_ID = 128


def request_id(client_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's x-request-id when it is a sane token, else a fresh one."""
    for name, value in client_headers:
        if name == b"x-request-id" and 0 < len(value) <= _MAX_REQUEST_ID and _is_token(value):
            return value
    return _new_id()


def _is_token(value: bytes) -> bool:
    return all(33 <= c <= 126 for c in value)


def _new_id() -> bytes:
    return os.urandom(16).hex().encode()  # uuid4's randomness, without building a UUID


def upstream_request_headers(client_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    out: Headers = [(b"content-type", b"application/json"), (b"x-request-id", rid)]
    out.extend((k, v) for k, v in client_headers if k in FORWARDED_REQUEST_HEADERS)
    return out


def client_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    out: Headers = [(k, v) for k, v in ((k.lower(), v) for k, v in upstream_headers) if relayed(k)]
    if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in out):
        out.extend(SSE_HEADERS)
    out.append((b"x-request-id", rid))
    return out


def relayed(name: bytes) -> bool:
    """Whether an upstream response header (lower-case name) may reach the client."""
    return name in RELAYED_RESPONSE_HEADERS or name.startswith(RELAYED_RESPONSE_PREFIXES)


def retry_after(headers: Headers) -> float | None:
    """Seconds from a `Retry-After` header (HTTP dates are not used by APIs: None)."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: rare from APIs, and the backoff still applies
    return None


def without_content_type(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k.lower() != b"content-type"]
