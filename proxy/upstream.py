"""The upstream call: the only module that speaks httpx (and, under it, aiohttp).

One pooled client per configured upstream, built at start-up and closed at shutdown.
httpx is the interface; its aiohttp transport carries the bytes, because httpcore's
per-read machinery costs ~5x more CPU per streamed token (bench/ and the peer numbers).
Every transport exception becomes one of ours here, so nothing above this module knows
which library failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from proxy import __version__
from proxy.config import Upstream
from proxy.errors import ProxyError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from proxy.headers import Headers

USER_AGENT = f"sluicegate/{__version__}"
SCRUBBED = b"***"
# Shorter "keys" are placeholders (vLLM's "EMPTY"): replacing them would only mangle a body.
MIN_SCRUBBED_KEY = 8


@dataclass(slots=True)
class UpstreamResponse:
    """An upstream answer whose body has not been read yet."""

    status: int
    headers: Headers
    upstream: str
    _response: httpx.Response
    _sent_at: float = 0.0  # monotonic time the request went out

    def elapsed(self) -> float:
        """Seconds since the request went out."""
        return time.monotonic() - self._sent_at

    @property
    def content_type(self) -> str:
        for name, value in self.headers:
            if name == b"content-type":
                return value.decode("latin-1")
        return ""

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the network delivers it: no re-chunking, no decoding."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except (httpx.HTTPError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise to_proxy_error(exc, self.upstream, reading=True) from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        # Closing an unfinished aiohttp response drops its connection, which is what
        # tells the upstream to stop generating.
        with contextlib.suppress(httpx.HTTPError, aiohttp.ClientError, OSError):
            await self._response.aclose()


class UpstreamClients:
    """One pooled client per upstream; `send` opens a request and returns at its headers."""

    def __init__(
        self, upstreams: Mapping[str, Upstream], reuse: UpstreamClients | None = None
    ) -> None:
        """With `reuse` (the clients of the config being replaced), an upstream whose
        definition did not change keeps its client and warm connections."""
        old = reuse._by_definition if reuse is not None else {}
        self._by_definition: dict[Upstream, httpx.AsyncClient] = {
            up: old.get(up) or _build_client(up) for up in upstreams.values()
        }
        self._clients = {up.name: client for up, client in self._by_definition.items()}

    def not_in(self, other: UpstreamClients) -> list[httpx.AsyncClient]:
        """Clients of ours that `other` does not use: to close once our requests are done."""
        kept = {id(c) for c in other._clients.values()}
        return [c for c in self._clients.values() if id(c) not in kept]

    async def aclose_except(self, other: UpstreamClients) -> None:
        await close_all(self.not_in(other))

    async def send(
        self, upstream: Upstream, path: str, body: bytes, headers: Headers
    ) -> UpstreamResponse:
        client = self._clients[upstream.name]
        request_headers = list(headers)  # httpx takes the raw byte pairs as they are
        if upstream.api_key is not None:
            request_headers.append(
                (b"authorization", f"Bearer {upstream.api_key.reveal()}".encode())
            )
        request = client.build_request(
            "POST", upstream.base_url + path, content=body, headers=request_headers
        )
        sent_at = time.monotonic()
        try:
            response = await client.send(request, stream=True)
        except (httpx.HTTPError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise to_proxy_error(exc, upstream.name, reading=False) from None
        return UpstreamResponse(
            response.status_code, response.headers.raw, upstream.name, response, sent_at
        )

    async def aclose(self) -> None:
        await close_all(list(self._clients.values()))


def scrub_key(upstream: Upstream, body: bytes, headers: Headers) -> tuple[bytes, Headers]:
    """An error answer without the upstream's own key: some upstreams quote the Authorization
    header they got in a 401, and the proxy relays error answers to its clients. For answers
    read whole (error answers); a committed answer's bytes are never touched."""
    key = upstream.api_key.reveal().encode() if upstream.api_key is not None else b""
    if len(key) < MIN_SCRUBBED_KEY:
        return body, headers
    scrubbed = [(name, value.replace(key, SCRUBBED)) for name, value in headers]
    return body.replace(key, SCRUBBED), scrubbed


async def close_all(clients: list[httpx.AsyncClient]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients))


def _build_client(upstream: Upstream) -> httpx.AsyncClient:
    t = upstream.timeouts
    limits = httpx.Limits(
        max_connections=upstream.max_connections,
        max_keepalive_connections=upstream.max_connections,
        keepalive_expiry=30.0,
    )

    def session() -> aiohttp.ClientSession:
        # Created lazily inside the running loop. No cookie jar: upstream cookies must
        # never leak from one client's request into another's.
        connector = aiohttp.TCPConnector(
            limit=upstream.max_connections, limit_per_host=0, keepalive_timeout=30.0
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, client=session),
        # `read` is the longest silence between bytes (aiohttp resets it per read); the wait
        # for response headers is bounded separately by the caller.
        timeout=httpx.Timeout(connect=t.connect, read=t.body_idle, write=t.read, pool=t.connect),
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
        cookies=httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))),
        follow_redirects=False,
        trust_env=False,
    )


def to_proxy_error(exc: BaseException, upstream: str, *, reading: bool) -> ProxyError:
    """Map a transport failure to the proxy's error tree.

    httpx-aiohttp maps every aiohttp connection error to httpx.ConnectTimeout, so the
    original aiohttp exception (its __cause__) is the more precise witness.
    """
    cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
    where = "while streaming the response" if reading else "before its response headers"
    if isinstance(cause, TimeoutError | httpx.TimeoutException) and not isinstance(
        cause, aiohttp.ServerDisconnectedError
    ):
        return UpstreamTimeout(f"upstream '{upstream}' timed out {where}")
    if isinstance(
        cause, aiohttp.ClientConnectorError | httpx.ConnectError | ConnectionRefusedError
    ):
        return UpstreamUnreachable(f"upstream '{upstream}' is unreachable")
    return UpstreamProtocolError(f"upstream '{upstream}' closed the connection {where}")
