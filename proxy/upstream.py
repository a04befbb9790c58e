"""The upstream call: the only module that speaks aiohttp.

One aiohttp session (and connection pool) per configured upstream, opened lazily inside
the running loop and closed at shutdown. The client is aiohttp itself: httpx over its
aiohttp transport cost ~15% more proxy CPU per streamed request for the same bytes, and
httpx over httpcore ~5x more (bench/PROFILE.md). Every transport exception becomes one of ours
here, so nothing above this module knows which library failed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import certifi
from yarl import URL

from proxy import __version__
from proxy.config import Tls, Upstream
from proxy.errors import (
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from proxy.headers import Forwarding, Headers
from proxy.silence import SilenceExceeded, SilenceTimer

USER_AGENT = f"sluicegate/{__version__}"
# What a body compressed against our `accept-encoding: identity` is decoded with (zlib's
# window bits); any other encoding fails the attempt, as the proxy cannot read it.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

# Sent unless the request carries its own header of that name, in this order, before the
# request's headers (as httpx merged its client defaults). With all of aiohttp's automatic
# headers present it adds only Host (first) and Content-Length (last).
_DEFAULT_HEADERS = (
    (b"accept", "accept", "*/*"),
    (b"connection", "connection", "keep-alive"),
    (b"user-agent", "user-agent", USER_AGENT),
    (b"accept-encoding", "accept-encoding", "identity"),
)
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
_URLS_KEPT = 16  # parsed URLs kept per upstream


class UpstreamResponse:
    """An upstream answer whose body has not been read yet."""

    __slots__ = ("_content", "_response", "_sent_at", "_silence", "headers", "status", "upstream")

    def __init__(
        self, response: aiohttp.ClientResponse, upstream: str, sent_at: float, idle: float
    ) -> None:
        self.status: int = response.status
        self.headers: Headers = list(response.raw_headers)
        self.upstream = upstream
        self._response = response
        self._content = response.content
        self._sent_at = sent_at  # monotonic time the request went out
        self._silence = SilenceTimer(response.content, idle)

    def elapsed(self) -> float:
        """Seconds since the request went out."""
        return time.monotonic() - self._sent_at

    @property
    def content_type(self) -> str:
        return self._header(b"content-type")

    @property
    def content_encoding(self) -> str:
        """The body's encoding, lower-case; "" for none (`identity`)."""
        encoding = self._header(b"content-encoding").strip().lower()
        return "" if encoding == "identity" else encoding

    def _header(self, wanted: bytes) -> str:
        for name, value in self.headers:
            if name.lower() == wanted:
                return value.decode("latin-1")
        return ""

    async def next_chunk(self) -> bytes:
        """The body's next bytes as the network delivered them (no re-chunking, no decoding);
        b"" at its end. The relay's hot loop does the same with `reader()`'s parts inline."""
        silence = self._silence
        silence.since = silence.now()
        try:
            chunk = await self._content.readany()
        except Exception as exc:
            raise self.read_error(exc) from None
        silence.since = None
        if not chunk:
            silence.stop()
        return chunk

    def reader(self) -> tuple[Callable[[], Awaitable[bytes]], SilenceTimer]:
        """`next_chunk`'s parts, for a loop that reads every chunk of a stream (the relay's):
        aiohttp's own `readany` (no frame of ours to resume per chunk) and the silence timer,
        whose `since` the loop sets around each read and which it stops at the end. A read's
        exception is turned into the proxy's error by `read_error`."""
        return self._content.readany, self._silence

    def read_error(self, exc: Exception) -> Exception:
        """What a failed read raises: the proxy's error for a silence or a transport failure,
        anything else unchanged."""
        if isinstance(exc, SilenceExceeded):
            message = f"upstream '{self.upstream}' timed out while streaming the response"
            return UpstreamTimeout(message)
        if isinstance(exc, _TRANSPORT_ERRORS):
            return to_proxy_error(exc, self.upstream, reading=True)
        return exc

    async def read(self, limit: int, what: str = "max_response_bytes") -> bytes:
        """The whole body, decoded when the upstream compressed it all the same (its
        content-encoding header is then dropped). Past `limit` bytes, read or decoded, the
        rest is not read: `UpstreamTooLarge`, naming the limit (`what`)."""
        parts, size = [], 0
        while chunk := await self.next_chunk():
            size += len(chunk)
            if size > limit:
                raise UpstreamTooLarge(self.too_large(what, limit))
            parts.append(chunk)
        body = b"".join(parts)
        encoding = self.content_encoding
        if not encoding:
            return body
        self.headers = [(k, v) for k, v in self.headers if k.lower() != b"content-encoding"]
        return self._decoded(body, encoding, limit, what)

    def _decoded(self, body: bytes, encoding: str, limit: int, what: str) -> bytes:
        wbits = _DECODERS.get(encoding)
        if wbits is None:
            shown = repr(encoding[:32])
            odd = f"upstream '{self.upstream}' answered in content-encoding {shown}, not identity"
            raise UpstreamProtocolError(odd)
        decoder = zlib.decompressobj(wbits)
        try:
            decoded = decoder.decompress(body, limit + 1)
        except zlib.error:
            bad = f"upstream '{self.upstream}' sent a body that is not valid {encoding}"
            raise UpstreamProtocolError(bad) from None
        if len(decoded) > limit:
            raise UpstreamTooLarge(self.too_large(what, limit))
        return decoded

    def too_large(self, what: str, limit: int) -> str:
        return f"upstream '{self.upstream}' sent more than {what} ({limit} bytes)"

    async def aclose(self) -> None:
        # A finished response has already given its connection back to the pool; closing
        # an unfinished one drops its connection, which tells the upstream to stop generating.
        self._silence.stop()
        self._response.close()


class _Pool:
    """One upstream definition's session: created on first use, inside the running loop."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, URL] = {}
        t = upstream.timeouts
        # No read timeout here: the caller bounds the wait for headers, and `SilenceTimer` the
        # silences inside a body.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=t.connect, sock_connect=t.connect, sock_read=None
        )
        # A per-upstream `proxy:` wins over HTTPS_PROXY/HTTP_PROXY (NO_PROXY honoured), read
        # here once per upstream: aiohttp's `trust_env` would look them up (and ~/.netrc) in a
        # thread for every request. Credentials go in a header of their own, so the URL
        # aiohttp holds (and may quote) has none.
        self.proxy, self.proxy_headers = _proxy(upstream)
        static = [(k, v if isinstance(v, str) else v.reveal()) for k, v in upstream.headers]
        self.forwarding = Forwarding(upstream.forward_headers, static)

    def session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._closed:
            raise RuntimeError(f"the client of upstream '{self._upstream.name}' is closed")
        connector = aiohttp.TCPConnector(
            limit=self._upstream.max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ssl=_ssl_context(self._upstream.tls)
            if self._upstream.base_url.startswith("https:")
            else True,
        )
        # No cookie jar: upstream cookies must never leak from one client's request into
        # another's. Bodies pass through as they come: no decompression, no redirects.
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            auto_decompress=False,
            trust_env=False,  # the environment's proxy is resolved once, in `_proxy`
        )
        return self._session

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = URL(self._upstream.base_url + path)
            if self._upstream.query:
                url = url.extend_query(self._upstream.query)
            if len(self._urls) < _URLS_KEPT:  # the API paths; not every retrieved id
                self._urls[path] = url
        return url

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


class UpstreamClients:
    """One pooled client per upstream; `send` opens a request and returns at its headers."""

    def __init__(
        self, upstreams: Mapping[str, Upstream], reuse: UpstreamClients | None = None
    ) -> None:
        """With `reuse` (the clients of the config being replaced), an upstream whose
        definition did not change keeps its client and warm connections."""
        old = reuse._by_definition if reuse is not None else {}
        self._by_definition: dict[Upstream, _Pool] = {
            up: old.get(up) or _Pool(up) for up in upstreams.values()
        }
        self._clients = {up.name: pool for up, pool in self._by_definition.items()}

    def not_in(self, other: UpstreamClients) -> list[_Pool]:
        """Clients of ours that `other` does not use: to close once our requests are done."""
        kept = {id(c) for c in other._clients.values()}
        return [c for c in self._clients.values() if id(c) not in kept]

    async def aclose_except(self, other: UpstreamClients) -> None:
        await close_all(self.not_in(other))

    async def send(
        self,
        upstream: Upstream,
        path: str,
        body: bytes,
        headers: Headers,
        *,
        method: str = "POST",
        query: str = "",  # the client's query string (retrieval), as it came
    ) -> UpstreamResponse:
        pool = self._clients[upstream.name]
        headers = pool.forwarding.request_headers(headers)
        names = {name for name, _ in headers}
        request_headers = [
            (text, value) for raw, text, value in _DEFAULT_HEADERS if raw not in names
        ]
        request_headers.extend((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
        if upstream.api_key is not None:
            request_headers.append(("authorization", f"Bearer {upstream.api_key.reveal()}"))
        sent_at = time.monotonic()
        try:
            response = await pool.session().request(
                method,
                pool.url(path).update_query(query) if query else pool.url(path),
                data=body,
                headers=request_headers,
                allow_redirects=False,
                compress=False,
                proxy=pool.proxy,
                proxy_headers=pool.proxy_headers,
            )
        except _TRANSPORT_ERRORS as exc:
            raise to_proxy_error(exc, upstream.name, reading=False) from None
        return UpstreamResponse(response, upstream.name, sent_at, upstream.timeouts.body_idle)

    async def aclose(self) -> None:
        await close_all(list(self._clients.values()))


async def close_all(clients: list[_Pool]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients))


def _ssl_context(tls: Tls) -> ssl.SSLContext:
    """`tls.ca_file` if set, else the trust store httpx used: $SSL_CERT_FILE or $SSL_CERT_DIR
    if set, else certifi's; with the client certificate of `tls.cert_file` (mTLS)."""
    if tls.ca_file:
        context = ssl.create_default_context(cafile=tls.ca_file)
    elif cafile := os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=cafile)
    elif capath := os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=capath)
    else:
        context = ssl.create_default_context(cafile=certifi.where())
    if not tls.verify:  # the config warns about it at every start and in `check`
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _env_proxy(base_url: str) -> str | None:
    """$HTTPS_PROXY or $HTTP_PROXY (as the scheme of `base_url` asks), unless $NO_PROXY
    names its host."""
    url = URL(base_url)
    if url.host is None or urllib.request.proxy_bypass(url.host):
        return None
    return urllib.request.getproxies().get(url.scheme)


def _proxy(upstream: Upstream) -> tuple[URL | None, dict[str, str] | None]:
    """The proxy for this upstream (its `proxy:`, else the environment's) without its
    credentials, and the header that carries them."""
    raw = upstream.proxy.reveal() if upstream.proxy is not None else _env_proxy(upstream.base_url)
    if raw is None:
        return None, None
    url = URL(raw)
    if url.user is None:
        return url, None
    basic = base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode("ascii")
    return url.with_user(None), {"proxy-authorization": f"Basic {basic}"}


def to_proxy_error(exc: BaseException, upstream: str, *, reading: bool) -> ProxyError:
    """Map a transport failure to the proxy's error tree."""
    where = "while streaming the response" if reading else "before its response headers"
    # A connect timeout sent nothing: unreachable (re-sent), not a timeout (`routing`).
    connecting = aiohttp.ConnectionTimeoutError
    if isinstance(exc, TimeoutError) and not isinstance(
        exc, aiohttp.ServerDisconnectedError | connecting
    ):
        return UpstreamTimeout(f"upstream '{upstream}' timed out {where}")
    if (tls := _tls_error(exc, upstream, reading=reading)) is not None:
        return tls
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy's URL is not shown
        return UpstreamUnreachable(
            f"upstream '{upstream}' is unreachable: its proxy answered {exc.status}"
        )
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError | connecting):
        return UpstreamUnreachable(f"upstream '{upstream}' is unreachable")
    return UpstreamProtocolError(f"upstream '{upstream}' closed the connection {where}")


def _tls_error(exc: BaseException, upstream: str, *, reading: bool) -> UpstreamTlsError | None:
    """A certificate failure either way, or another failed handshake; None if not TLS."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = _tls_reason(exc.certificate_error)
        return UpstreamTlsError(
            f"the certificate of upstream '{upstream}' could not be verified{reason}"
        )
    # An alert naming a certificate is the upstream refusing ours (none sent to an mTLS
    # upstream, or one it does not trust): under TLS 1.3 the client's handshake is over
    # before the server checks it, so the alert comes on the first read (aiohttp's
    # ClientOSError caused by the SSLError); under TLS 1.2 it fails the handshake.
    for error in (exc, exc.__cause__, getattr(exc, "os_error", None)):
        alert = str(getattr(error, "reason", None) or "")  # aiohttp's SSL errors have none
        ours = "CERTIFICATE" in alert or alert.endswith("UNKNOWN_CA")
        if error is not None and "_ALERT_" in alert and ours:
            return UpstreamTlsError(
                f"upstream '{upstream}' refused the connection's client certificate"
                + _tls_reason(error)
            )
    if not reading and isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        reason = _tls_reason(exc)
        return UpstreamTlsError(f"the TLS handshake with upstream '{upstream}' failed{reason}")
    return None


def _tls_reason(exc: BaseException) -> str:
    """What OpenSSL said (": certificate has expired"), without the connection's details."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f": {exc.verify_message}"
    original = getattr(exc, "os_error", None)  # aiohttp's ClientConnectorSSLError wraps it
    if isinstance(original, ssl.SSLError):
        exc = original
    reason = getattr(exc, "reason", None)
    return f": {str(reason).lower().replace('_', ' ')}" if reason else ""
