"""Header hygiene at both boundaries (pure).

Both boundaries are allowlists. Upstream requests carry the client's headers named by the
upstream's `forward_headers` (names or `x-team-*` patterns) besides `DEFAULT_FORWARDED`: never
its credentials, cookies or hop-by-hop headers (`NEVER_FORWARDED`, which the config refuses
in any rule). Client responses carry only the upstream headers an OpenAI client reads
(docs/BEHAVIOUR.md): never an upstream's cookies, redirects, CORS grants or server directives
(`X-Accel-Redirect`); the upstream's own request id comes back as `x-upstream-request-id`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Client headers that travel to every upstream, each for a reason (docs/BEHAVIOUR.md): what
# the answer's format depends on (accept, openai-beta), who is calling (user-agent), W3C trace
# context (traceparent, tracestate: ids only, by design), and the client's idempotency key, so
# an upstream that honours it never bills one request twice.
DEFAULT_FORWARDED = frozenset(
    {"accept", "user-agent", "openai-beta", "traceparent", "tracestate", "idempotency-key"}
)
# Never sent on from a client, whatever the config says: credentials (the upstream's key
# comes from the config), cookies, hop-by-hop headers (RFC 9110 §7.6.1), and what the proxy
# sets itself for the body it sends (length, type, encoding, host, its request id).
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
PROXY_SET = frozenset(
    {"host", "content-length", "content-type", "accept-encoding", "expect", "x-request-id"}
)
NEVER_FORWARDED = CREDENTIALS | HOP_BY_HOP | PROXY_SET
_DEFAULT_BYTES = frozenset(name.encode() for name in DEFAULT_FORWARDED)
_NEVER_BYTES = frozenset(name.encode() for name in NEVER_FORWARDED)

# Upstream response headers that reach the client, by exact name or by prefix; the proxy's
# own x-request-id replaces the upstream's, and the body is re-framed (no length, encoding).
RELAYED_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"retry-after", b"retry-after-ms", b"x-should-retry"}
)
RELAYED_RESPONSE_PREFIXES = (b"openai-", b"x-ratelimit-")
# Where upstreams put their own request id, most specific first: OpenAI, vLLM and Azure's
# x-request-id; Anthropic's request-id; Azure API Management's apim-request-id.
UPSTREAM_REQUEST_IDS = (b"x-request-id", b"request-id", b"apim-request-id")
UPSTREAM_REQUEST_ID = b"x-upstream-request-id"
_ID_RANK = {name: rank for rank, name in enumerate(UPSTREAM_REQUEST_IDS)}

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


def pattern(rule: str) -> re.Pattern[str]:
    """A `forward_headers` rule (a name, `*` standing for any run of characters) as a regex
    over lower-case names."""
    return re.compile(".*".join(map(re.escape, rule.lower().split("*"))))


def refused_by(rule: str) -> list[str]:
    """The never-forwarded names a rule would match, sorted: the config refuses it if any."""
    match = pattern(rule).fullmatch
    return sorted(name for name in NEVER_FORWARDED if match(name))


class Forwarding:
    """One upstream's request headers: which client headers it gets (the defaults and its
    `forward_headers`) and its static `headers:` (names lower-case), which win over them."""

    __slots__ = ("_keep", "_names", "_patterns", "_static")

    def __init__(self, rules: Iterable[str] = (), static: Iterable[tuple[str, str]] = ()) -> None:
        rules = [rule.lower() for rule in rules]
        self._names = _DEFAULT_BYTES | {r.encode() for r in rules if "*" not in r}
        self._patterns = [pattern(r) for r in rules if "*" in r]
        self._static = [(name.lower().encode(), value.encode("latin-1")) for name, value in static]
        # What `request_headers` keeps by name alone: one set lookup a header.
        overridden = {name for name, _ in self._static}
        self._keep = (
            (self._names - _NEVER_BYTES) | {b"content-type", b"x-request-id"}
        ) - overridden

    def forwards(self, name: bytes) -> bool:
        """Whether a client header (lower-case name, as ASGI gives it) goes upstream."""
        if name in _NEVER_BYTES:
            return False
        if name in self._names:
            return True
        text = name.decode("latin-1")
        return any(p.fullmatch(text) for p in self._patterns)

    def request_headers(self, sent: Headers) -> Headers:
        """`sent` (from `upstream_request_headers`: the proxy's own headers, then the client's
        that may travel at all) as this upstream gets it."""
        keep = self._keep
        if self._patterns:
            overridden = {name for name, _ in self._static}
            out = [
                (k, v) for k, v in sent if k in keep or (k not in overridden and self.forwards(k))
            ]
        else:
            out = [(k, v) for k, v in sent if k in keep]
        out.extend(self._static)
        return out


def upstream_request_headers(client_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    """The proxy's own headers and every client header an upstream could be configured to
    get; `Forwarding.request_headers` keeps, per upstream, the ones it does get."""
    out: Headers = [(b"content-type", b"application/json"), (b"x-request-id", rid)]
    out.extend((k, v) for k, v in client_headers if k not in _NEVER_BYTES)
    return out


def client_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> Headers:
    out: Headers = []
    upstream_id, rank = None, len(UPSTREAM_REQUEST_IDS)
    for raw, value in upstream_headers:
        name = raw.lower()
        if relayed(name):
            out.append((name, value))
        elif name in _ID_RANK and _ID_RANK[name] < rank:
            upstream_id, rank = value, _ID_RANK[name]
    if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in out):
        out.extend(SSE_HEADERS)
    if upstream_id is not None:
        out.append((UPSTREAM_REQUEST_ID, upstream_id))
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
