"""Config loading, phase two: walk the plain data once, collect every issue, build Config."""

from __future__ import annotations

import re
from typing import TypedDict
from urllib.parse import urlsplit

from proxy.config.checks import Data
from proxy.config.document import child_path
from proxy.config.fleet import FleetChecks
from proxy.config.model import (
    RESPONSES_MODES,
    STRATEGIES,
    STREAM_OPTIONS_MODES,
    ClientKey,
    Config,
    Cooldown,
    Price,
    Route,
    Secret,
    ServerSettings,
    Target,
    Timeouts,
    Upstream,
    UsageHeaders,
)
from proxy.config.outliers import LatencyChecks
from proxy.config.tls import TransportChecks

_UP, _SERVER = Upstream("", ""), ServerSettings()  # where the validator finds defaults
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a metric label value
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HOST = re.compile(r"[0-9A-Za-z.:%_-]+")  # a name, an IPv4 or a bare IPv6 address
# Room for a request line and the headers an SDK sends with a key: a smaller cap is a typo.
MIN_HEADER_BYTES = 1024
_TOKEN = re.compile(r"[\x21-\x7e]+")  # what survives in a header: no spaces, no line breaks
_ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[0-9a-z.-]+)(:[0-9]{1,5})?", re.I)  # no path


class _BrowserSettings(TypedDict):
    cors_origins: frozenset[str]
    allowed_hosts: frozenset[str] | None


class _ConnectionSettings(TypedDict):
    max_header_bytes: int
    header_timeout: float
    max_connections: int | None


class _MetricsSettings(TypedDict):
    metrics_port: int | None
    metrics_host: str | None
    metrics_token: Secret | None


class Validator(FleetChecks, LatencyChecks, TransportChecks):
    """The schema of routes.yaml, section by section, on top of the generic checks."""

    def config(self, raw: object) -> Config:
        if raw is None:
            self.issue("", "the file is empty; expected a mapping with 'upstreams' and 'routes'")
        top = self.section(raw, "", Config, "upstreams", "routes") if raw is not None else {}
        server = self.section(_optional(top.get("server")), "server", ServerSettings)
        max_body = self.number(server, "max_body_bytes", "server", _SERVER.max_body_bytes, "count")
        budget = self.number(server, "retry_budget", "server", _SERVER.retry_budget, "non-negative")
        upstreams = self.upstreams(top.get("upstreams"))
        routes = self.routes(top.get("routes"))
        return Config(
            server=ServerSettings(
                max_body_bytes=int(max_body),
                body_timeout=self.number(
                    server, "body_timeout", "server", _SERVER.body_timeout, "positive"
                ),
                max_echoed_chars=int(
                    self.number(
                        server, "max_echoed_chars", "server", _SERVER.max_echoed_chars, "count"
                    )
                ),
                max_inflight=self.optional_int(server, "max_inflight", "server"),
                max_event_bytes=int(
                    self.number(
                        server, "max_event_bytes", "server", _SERVER.max_event_bytes, "count"
                    )
                ),
                **self.connection(server),
                drain_seconds=self.number(
                    server, "drain_seconds", "server", _SERVER.drain_seconds, "non-negative"
                ),
                retry_budget=budget,
                keepalive_seconds=self.optional_seconds(server, "keepalive_seconds", "server")
                if "keepalive_seconds" in server
                else _SERVER.keepalive_seconds,
                finish_after_abort=self.optional_seconds(server, "finish_after_abort", "server"),
                **self.metrics(server),
                **self.browsers(server),
            ),
            upstreams=upstreams,
            routes=routes,
            pricing=self.pricing(top.get("pricing")),
            source=self.source,
            keys=self.keys(top.get("keys"), routes),
            state=self.state(top.get("state")),
        )

    def connection(self, server: Data) -> _ConnectionSettings:
        head = self.number(server, "max_header_bytes", "server", _SERVER.max_header_bytes, "count")
        if head < MIN_HEADER_BYTES:
            got = self.shown("server.max_header_bytes", int(head))
            self.issue("server.max_header_bytes", f"must be {MIN_HEADER_BYTES} or more, got {got}")
        return {
            "max_header_bytes": int(head),
            "header_timeout": self.number(
                server, "header_timeout", "server", _SERVER.header_timeout, "positive"
            ),
            "max_connections": self.optional_int(server, "max_connections", "server"),
        }

    def metrics(self, server: Data) -> _MetricsSettings:
        port = self.optional_int(server, "metrics_port", "server")
        ppath, hpath = "server.metrics_port", "server.metrics_host"
        if port is not None and port > 65535:
            self.issue(ppath, f"must be 65535 or less, got {self.shown(ppath, port)}")
        elif port is not None and port == self.main_port:
            self.issue(ppath, f"must differ from the main port (--port {port})")
        host = self.string(server, "metrics_host", "server") or None
        if host and not _HOST.fullmatch(host):
            got = self.shown(hpath, host, bare=True)
            self.issue(hpath, f"expected a host name or IP address to listen on, got {got}")
        if host and port is None:
            self.issue(hpath, "needs server.metrics_port (or drop it: the main --host is used)")
        token = self.string(server, "metrics_token", "server", secret=True)
        if token and not _TOKEN.fullmatch(token):  # never echoed: it is a secret
            self.issue(
                "server.metrics_token",
                "expected printable ASCII without spaces or line breaks (a trailing newline?)",
            )
        return {
            "metrics_port": port if port is not None and port <= 65535 else None,
            "metrics_host": host,
            "metrics_token": Secret(token) if token else None,
        }

    def browsers(self, server: Data) -> _BrowserSettings:
        origins = self.strings(server, "cors_origins", "server", "origin")
        for opath, origin in origins:
            if not _ORIGIN.fullmatch(origin):
                got = self.shown(opath, origin, bare=True)
                self.issue(opath, f"expected scheme://host[:port] as a browser sends it, got {got}")
        hosts = self.strings(server, "allowed_hosts", "server", "host name")
        for hpath, host in hosts:
            if not _HOST.fullmatch(host.strip("[]")) or host.count(":") == 1:  # name:port
                got = self.shown(hpath, host, bare=True)
                self.issue(hpath, f"expected a host name or IP address, without a port, got {got}")
        return {
            "cors_origins": frozenset(origin.lower() for _, origin in origins),
            "allowed_hosts": frozenset(h.lower().strip("[]") for _, h in hosts)
            if server.get("allowed_hosts") is not None
            else None,
        }

    def upstreams(self, raw: object) -> dict[str, Upstream]:
        entries = self.entries(raw, "upstreams", dict, "upstream")
        if entries:
            self.declared = tuple(name for name, _, _ in entries if name)
        return {name: self.upstream(name, path, value) for name, path, value in entries}

    def upstream(self, name: str, path: str, raw: object) -> Upstream:
        if not name:
            self.issue(path, "expected a non-empty upstream name")
        data = self.section(raw, path, Upstream, "base_url")
        url = self.string(data, "base_url", path)
        problem = _url_problem(url) if url else None
        if problem:
            url_path = child_path(path, "base_url")
            got = self.shown(url_path, _without_password(url), bare=True)
            self.issue(url_path, f"{problem}, got {got}")
        mode = self.string(data, "stream_options", path) or "auto"
        if mode not in STREAM_OPTIONS_MODES:
            mode_path = child_path(path, "stream_options")
            got = self.shown(mode_path, mode, bare=True)
            self.issue(mode_path, f"expected one of auto, pass, strip, got {got}")
        tpath = child_path(path, "timeouts")
        timeouts = self.section(_optional(data.get("timeouts")), tpath, Timeouts)
        api_key = self.api_key(data, path, url)
        pool = self.number(data, "max_connections", path, _UP.max_connections, "count")
        most = self.number(data, "max_response_bytes", path, _UP.max_response_bytes, "count")
        return Upstream(
            name=name,
            base_url=url.rstrip("/"),
            api_key=Secret(api_key) if api_key else None,  # "${KEY:-}" → "" means no key
            stream_options=STREAM_OPTIONS_MODES.get(mode, "auto"),
            usage_headers=self.usage_headers(_optional(data.get("usage_headers")), path),
            timeouts=Timeouts(
                connect=self.number(timeouts, "connect", tpath, _UP.timeouts.connect, "positive"),
                read=self.number(timeouts, "read", tpath, _UP.timeouts.read, "positive"),
                idle=self.optional_seconds(timeouts, "idle", tpath),
                total=self.optional_seconds(timeouts, "total", tpath),
            ),
            max_connections=int(pool),
            cooldown=self.cooldown(_optional(data.get("cooldown")), child_path(path, "cooldown")),
            max_response_bytes=int(most),
            tls=self.tls(data.get("tls"), path, url),
            proxy=self.proxy(data, path),
            responses=self.choice(data, "responses", path, RESPONSES_MODES),
        )

    def api_key(self, data: Data, path: str, url: str) -> str:
        """The key, checked like metrics_token; never echoed. A single trailing newline (a
        Secret made with `kubectl --from-file`) is trimmed, with a warning."""
        key = self.string(data, "api_key", path, empty=True, secret=True)
        kpath = child_path(path, "api_key")
        trimmed = key.removesuffix("\n").removesuffix("\r") if key.endswith("\n") else key
        if key and trimmed != key and _TOKEN.fullmatch(trimmed):
            self.warn(kpath, "a trailing newline was trimmed from the key")
            key = trimmed
        if key and not _TOKEN.fullmatch(key):
            self.issue(kpath, "expected printable ASCII without spaces, line breaks or controls")
        if key and _has_userinfo(url):
            self.issue(kpath, "base_url carries credentials (user:pass@) too: keep one of them")
        return key

    def cooldown(self, raw: object, path: str) -> Cooldown:
        data = self.section(raw, path, Cooldown)
        return Cooldown(
            failures=int(self.number(data, "failures", path, _UP.cooldown.failures, "count")),
            seconds=self.number(data, "seconds", path, _UP.cooldown.seconds, "non-negative"),
        )

    def usage_headers(self, raw: object, path: str) -> UsageHeaders:
        path = child_path(path, "usage_headers")
        data = self.section(raw, path, UsageHeaders)
        names: list[str | None] = []
        for key in ("prompt_tokens", "completion_tokens"):
            name = self.string(data, key, path)
            if name and not _HEADER_NAME.fullmatch(name):
                got = self.shown(child_path(path, key), name, bare=True)
                self.issue(child_path(path, key), f"expected an HTTP header name, got {got}")
            names.append(name.lower() or None)
        return UsageHeaders(*names)

    def routes(self, raw: object) -> tuple[Route, ...]:
        entries = self.entries(raw, "routes", list, "route")
        routes = tuple(self.route(path, value) for _, path, value in entries)
        first: dict[str, int] = {}
        for i, route in enumerate(routes):
            if route.model in first:
                path = f"routes[{i}].model"
                shown = self.shown(path, route.model, bare=True)
                where = f"routes[{first[route.model]}]"
                self.issue(path, f"duplicate route model {shown} (first defined at {where})")
            elif route.model:
                first[route.model] = i
        return routes

    def route(self, path: str, raw: object) -> Route:
        data = self.section(raw, path, Route, "model", "targets")
        strategy = self.string(data, "strategy", path) or "weighted"
        if strategy not in STRATEGIES:
            spath = child_path(path, "strategy")
            got = self.shown(spath, strategy, bare=True)
            self.issue(spath, f"expected one of weighted, least_inflight, fastest, got {got}")
        retries = self.number(data, "retries", path, 2, "non-negative")
        if retries != int(retries):
            self.issue(child_path(path, "retries"), f"expected an integer, got {retries}")
        return Route(
            model=self.string(data, "model", path),
            targets=self.targets(data, "targets", path),
            fallbacks=self.targets(data, "fallbacks", path),
            first_token_timeout=self.optional_seconds(data, "first_token_timeout", path),
            strategy=STRATEGIES.get(strategy, "weighted"),
            retries=int(retries),
            hedge_after=self.hedge_after(data, path),
            outliers=self.outliers(data.get("outliers"), path),
        )

    def targets(self, data: Data, key: str, path: str) -> tuple[Target, ...]:
        path = child_path(path, key)
        entries = self.entries(data.get(key), path, list, "target", empty=key == "fallbacks")
        return tuple(self.target(value, path) for _, path, value in entries)

    def target(self, raw: object, path: str) -> Target:
        data = self.section(raw, path, Target, "upstream", "model")
        upstream = self.string(data, "upstream", path)
        if upstream and self.declared is not None and upstream not in self.declared:
            upath = child_path(path, "upstream")
            shown = self.shown(upath, upstream, bare=True)
            self.issue(upath, f"unknown upstream {shown} (declared: {', '.join(self.declared)})")
        return Target(
            upstream=upstream,
            model=self.string(data, "model", path),
            weight=self.number(data, "weight", path, 1.0, "positive"),
            first_token_timeout=self.optional_seconds(data, "first_token_timeout", path),
        )

    def pricing(self, raw: object) -> dict[str, Price]:
        result: dict[str, Price] = {}
        for model, path, value in self.entries(raw, "pricing", dict, "model price", empty=True):
            data = self.section(value, path, Price, "input", "output")
            input_ = self.number(data, "input", path, 0.0, "non-negative")
            result[model] = Price(
                input=input_,
                output=self.number(data, "output", path, 0.0, "non-negative"),
                cached_input=self.number(data, "cached_input", path, input_, "non-negative"),
            )
        return result

    def keys(self, raw: object, routes: tuple[Route, ...]) -> tuple[ClientKey, ...]:
        known = [route.model for route in routes]
        keys, seen = [], set()
        for name, path, value in self.entries(raw, "keys", dict, "client key"):
            if not _KEY_NAME.fullmatch(name):
                got = self.shown(path, name, bare=True)
                self.issue(
                    path, f"expected a key name of letters, digits, '.', '_', '-', got {got}"
                )
            data = self.section(value, path, ClientKey, "sha256")
            # Never echoed: a raw key pasted here by mistake must not reach a log.
            digest = self.string(data, "sha256", path, secret=True).lower()
            hpath = child_path(path, "sha256")
            if digest and not _SHA256.fullmatch(digest):
                self.issue(
                    hpath,
                    "expected the key's SHA-256 as 64 hex digits "
                    "(`sluicegate hash-key` prints it), got something else",
                )
            elif digest in seen:
                self.issue(hpath, "the same key is listed twice")
            seen.add(digest)
            keys.append(ClientKey(
                name=name,
                sha256=digest,
                models=self.key_models(data.get("models"), child_path(path, "models"), known),
                rpm=self.optional_int(data, "rpm", path),
                tpm=self.optional_int(data, "tpm", path),
                budget=self.budget(data.get("budget"), path),
            ))  # fmt: skip
        return tuple(keys)

    def key_models(self, raw: object, path: str, known: list[str]) -> tuple[str, ...] | None:
        if raw is None:
            return None  # every route
        models = []
        for _, mpath, model in self.entries(raw, path, list, "route model"):
            if not isinstance(model, str) or model not in known:
                got = self.shown(mpath, model, bare=True)
                self.issue(mpath, f"expected a route model ({', '.join(known)}), got {got}")
            else:
                models.append(model)
        return tuple(models)


def _optional(value: object) -> object:
    """An optional section left empty (`pricing:`, entries all commented out) reads as null."""
    return {} if value is None else value


def _has_userinfo(url: str) -> bool:
    return "@" in urlsplit(url).netloc if _url_problem(url) is None else False


def _without_password(url: str) -> str:
    """The URL as a message may show it: a password in `user:pass@` becomes `***`."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        return "expected an http:// or https:// URL with a host"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return "expected an http:// or https:// URL with a valid port (1-65535)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host"
    if parts.query or parts.fragment:
        # Paths are appended to base_url; a query or fragment would end up in the middle.
        return "expected a URL without a query or fragment"
    return None
