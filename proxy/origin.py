"""What a web page can make a browser send, and the checks that refuse it (pure); the threat
is described in docs/SECURITY.md.

Any page a visitor opens can POST `text/plain` or form data to any address that visitor's
browser reaches (a laptop's loopback, an office network) without a CORS preflight. So the API
endpoints take `application/json` only, as OpenAI's do: a page can send that only after a
preflight, which this proxy grants only to `server.cors_origins` (proxy.cors). An open proxy
(no `keys:`) also refuses a request whose `Origin` is neither its own nor listed there (`*`:
any). DNS rebinding (a page whose own name comes to point at the proxy) is same-origin to the
browser; `server.allowed_hosts` refuses every `Host` not listed.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config import ServerSettings
from proxy.errors import HostNotAllowed, OriginNotAllowed, UnsupportedMediaType, clipped

# Probes come by address (a pod IP), whatever names are allowed.
UNCHECKED_HOST_PATHS = frozenset({"/healthz", "/readyz"})


def check_api_request(
    headers: Iterable[tuple[bytes, bytes]], server: ServerSettings, *, open_proxy: bool
) -> None:
    """Raises OriginNotAllowed (403) or UnsupportedMediaType (415)."""
    content_type = origin = host = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"origin":
            origin = value
        elif name == b"host":
            host = value
    if open_proxy and origin is not None and not _origin_allowed(origin, host, server):
        shown = clipped(origin.decode("latin-1"), server.max_echoed_chars)
        raise OriginNotAllowed(
            f"Requests from the web page at '{shown}' are not accepted by this proxy "
            "(server.cors_origins lists the pages that may call it)."
        )
    if content_type is None or not _is_json(content_type):
        shown = clipped((content_type or b"").decode("latin-1"), server.max_echoed_chars)
        raise UnsupportedMediaType(
            f"Unsupported content type: '{shown}'. This API method only accepts "
            "'application/json' requests."
        )


def check_host(headers: Iterable[tuple[bytes, bytes]], server: ServerSettings) -> None:
    """Raises HostNotAllowed (421) when `server.allowed_hosts` is set and lacks the Host."""
    allowed = server.allowed_hosts
    if allowed is None:
        return
    host = next((value for name, value in headers if name == b"host"), b"")
    if host_name(host) not in allowed:
        shown = clipped(host.decode("latin-1"), server.max_echoed_chars)
        raise HostNotAllowed(f"This proxy does not serve the host '{shown}'.")


def host_name(host: bytes) -> str:
    """The name in a Host header, lower-cased, without its port: `[::1]:8080` → `::1`."""
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.partition(":")[0]


def _is_json(content_type: bytes) -> bool:
    return content_type.partition(b";")[0].strip().lower() == b"application/json"


def _origin_allowed(origin: bytes, host: bytes | None, server: ServerSettings) -> bool:
    text = origin.decode("latin-1").lower()
    if text in server.cors_origins or "*" in server.cors_origins:
        return True
    _, sep, authority = text.partition("://")  # the page's own proxy: same scheme-less authority
    return bool(sep) and host is not None and authority == host.decode("latin-1").lower()
