"""CORS for browser apps on the origins listed in `server.cors_origins` (pure): the preflight's
answer, and the grant every response to such a page carries (streams and errors too).

Nothing here runs without `cors_origins`: no header is read and `send` is not wrapped. With
it, a request whose `Origin` is listed (or any, with `*`) is granted: the origin is echoed
(never `*`, so a page that sends cookies gets a usable answer too), with `vary: origin`. An
origin that is not listed gets no CORS header, and the browser keeps the answer from the page.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.asgi import Message, Send
from proxy.config import Config
from proxy.headers import Forwarding, Headers

ANY = "*"
METHODS = b"GET, POST, OPTIONS"
MAX_AGE = b"600"  # seconds a browser may reuse a preflight's answer (Chromium caps it at 7200)
# Request headers a page may send besides those an upstream forwards: its key, the body's
# type, the SDKs' own (openai-js in a browser sends x-stainless-*), the request id.
ALLOWED = frozenset({"authorization", "content-type", "accept", "x-request-id"})
ALLOWED_PREFIXES = ("openai-", "x-stainless-")
# Response headers a page may read: the ids to quote, and what the SDKs back off by.
EXPOSED = b", ".join([
    b"x-request-id", b"x-upstream-request-id", b"openai-processing-ms", b"openai-model",
    b"retry-after", b"retry-after-ms", b"x-should-retry",
    *(b"x-ratelimit-%s-%s" % (kind, what)
      for kind in (b"limit", b"remaining", b"reset") for what in (b"requests", b"tokens")),
])  # fmt: skip


def granted(headers: Iterable[tuple[bytes, bytes]], origins: frozenset[str]) -> bytes | None:
    """The request's `Origin` when `origins` (non-empty) grants it, else None."""
    for name, value in headers:
        if name == b"origin":
            text = value.decode("latin-1").lower()
            return value if ANY in origins or text in origins else None
    return None


def grant(origin: bytes) -> Headers:
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", EXPOSED),
        (b"vary", b"origin"),
    ]


def preflight(headers: Iterable[tuple[bytes, bytes]], origin: bytes, config: Config) -> Headers:
    """The 204's headers: the methods, and of the headers the page asks to send, the ones it may."""
    asked = next((v for k, v in headers if k == b"access-control-request-headers"), b"")
    names = [n.strip().lower() for n in asked.decode("latin-1").split(",") if n.strip()]
    rules = [Forwarding(up.forward_headers) for up in config.upstreams.values()] or [Forwarding()]
    allowed = [n for n in names if _allowed(n, rules)]
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", METHODS),
        (b"access-control-allow-headers", ", ".join(allowed).encode("latin-1")),
        (b"access-control-max-age", MAX_AGE),
        (b"vary", b"origin"),
    ]


def _allowed(name: str, rules: list[Forwarding]) -> bool:
    if name in ALLOWED or name.startswith(ALLOWED_PREFIXES):
        return True
    return any(rule.forwards(name.encode("latin-1")) for rule in rules)


def granting(send: Send, origin: bytes) -> Send:
    """`send` with the grant added to the response's headers."""
    extra = grant(origin)

    async def send_granted(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return send_granted
