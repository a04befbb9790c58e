"""Header hygiene at both boundaries (pure).

Upstream requests carry an allowlist of the client's headers: never its credentials,
cookies or hop-by-hop headers. Client responses carry the upstream's headers less
hop-by-hop ones, lengths (the body is re-framed) and cookies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Client headers that may travel upstream. Authorization is replaced by the upstream's
# own key; everything else (cookies, x-stainless-*, organisation ids) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"accept", b"user-agent", b"openai-beta"})

DROPPED_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"set-cookie",
        b"server",
        b"date",
        b"x-request-id",
    }
)

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
    return uuid.uuid4().hex.encode()


def upstream_request_headers(client_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    out: Headers = [(b"content-type", b"application/json"), (b"x-request-id", rid)]
    out.extend((k, v) for k, v in client_headers if k in FORWARDED_REQUEST_HEADERS)
    return out


def client_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    out: Headers = [
        (k.lower(), v) for k, v in upstream_headers if k.lower() not in DROPPED_RESPONSE_HEADERS
    ]
    if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in out):
        out = [(k, v) for k, v in out if k not in (b"cache-control", b"x-accel-buffering")]
        out.extend(SSE_HEADERS)
    out.append((b"x-request-id", rid))
    return out


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
