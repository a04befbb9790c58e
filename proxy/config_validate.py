"""Config loading, phase two: walk the plain data once, collect every issue, build Config."""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Literal, TypedDict
from urllib.parse import urlsplit

from proxy.config_model import (
    STRATEGIES,
    STREAM_OPTIONS_MODES,
    Config,
    ConfigIssue,
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
from proxy.config_yaml import YamlDocument, child_path, describe

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


_Data = Mapping[str, object]
_UP, _SERVER = Upstream("", ""), ServerSettings()  # where the validator finds defaults
_Kind = Literal["positive", "non-negative", "count"]  # > 0, >= 0, an integer >= 1
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_HOST = re.compile(r"[0-9A-Za-z.:%_-]+")  # a name, an IPv4 or a bare IPv6 address
_TOKEN = re.compile(r"[\x21-\x7e]+")  # what survives in a header: no spaces, no line breaks


class _MetricsSettings(TypedDict):
    metrics_port: int | None
    metrics_host: str | None
    metrics_token: Secret | None


class Validator:
    """Walks the data once. Every check records an issue and then returns a placeholder, so
    one mistake never hides the next; the placeholders are thrown away with the Config."""

    def __init__(self, source: str, doc: YamlDocument, main_port: int | None = None) -> None:
        self.source = source
        self.main_port = main_port  # `serve --port`, when known: metrics_port must differ
        self.lines = doc.lines
        self.templates = doc.templates  # expanded paths: show their "${...}", never the value
        self.issues = [ConfigIssue(source, p.line, p.path, p.message) for p in doc.problems]
        # A value YAML could not read or expand is reported once, not again as the wrong type.
        self.flagged = {p.path for p in doc.problems}
        self.declared: tuple[str, ...] | None = None  # upstream names, once known

    def issue(self, path: str, message: str) -> None:
        if path not in self.flagged:
            self.issues.append(ConfigIssue(self.source, self.lines.get(path), path, message))

    def shown(self, path: str, value: object, *, bare: bool = False) -> str:
        template = self.templates.get(path)
        if template is not None:
            return f"from {template!r}" if bare else f"the expansion of {template!r}"
        return repr(value) if bare else describe(value)

    def section(
        self, raw: object, path: str, cls: type[DataclassInstance], *required: str
    ) -> _Data:
        """A mapping with a fixed key set; anything unusable reads as empty so checks go on."""
        if not isinstance(raw, dict):
            self.issue(path, f"expected a mapping, got {describe(raw)}")
            return {}
        # The keys are the dataclass's fields, so the schema cannot drift from the types.
        allowed = [f.name for f in fields(cls) if f.init and f.name not in ("name", "source")]
        for key in raw:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
                self.issue(child_path(path, key), f"unknown key {key!r} ({hint})")
        for key in required:
            if key not in raw:
                self.issue(path, f"missing required key {key!r}")
            elif raw[key] is None:
                self.issue(child_path(path, key), "expected a value, got null")
        return raw

    def entries(
        self,
        raw: object,
        path: str,
        kind: type[dict[str, object] | list[object]],
        what: str,
        *,
        empty: bool = False,
    ) -> list[tuple[str, str, object]]:
        """(key, path, value) of each entry of a list or mapping; none if absent or invalid."""
        if raw is None:
            return []
        if not isinstance(raw, kind) or not (raw or empty):
            noun = "mapping" if kind is dict else "list"
            got = f"an empty {noun}" if isinstance(raw, kind) else describe(raw)
            need = f"a {noun} of {what}s" if empty else f"a {noun} of at least one {what}"
            self.issue(path, f"expected {need}, got {got}")
            return []
        if isinstance(raw, dict):
            return [(key, child_path(path, key), value) for key, value in raw.items()]
        return [(str(i), f"{path}[{i}]", value) for i, value in enumerate(raw)]

    def string(
        self, data: _Data, key: str, path: str, *, empty: bool = False, secret: bool = False
    ) -> str:
        """ "" when absent or invalid."""
        path = child_path(path, key)
        raw = data.get(key)
        if raw is None:
            return ""
        if not isinstance(raw, str):
            # A secret pasted in unquoted may read as a number: do not echo it.
            got = "another type" if secret else describe(raw)
            self.issue(path, f"expected a string, got {got}")
            return ""
        if not raw and not empty:
            self.issue(path, "expected a non-empty string")
        return raw

    def number(self, data: _Data, key: str, path: str, default: float, kind: _Kind) -> float:
        """data[key], or `default` when absent or invalid (then with an issue)."""
        path, value = child_path(path, key), data.get(key)
        integer = kind == "count"
        least, inclusive = (1, True) if integer else (0, kind == "non-negative")
        if isinstance(value, str) and path in self.templates:
            # "${VAR}" expands to text; a number field reads it as a number if it is one.
            with contextlib.suppress(ValueError):
                value = int(value) if integer else float(value)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and isinstance(value, float))
            or not math.isfinite(value)
        ):
            expected = "an integer" if integer else "a number"
            self.issue(path, f"expected {expected}, got {self.shown(path, value)}")
        elif value < least or (value == least and not inclusive):
            bound = f"{least} or more" if inclusive else f"greater than {least}"
            self.issue(path, f"must be {bound}, got {self.shown(path, value)}")
        else:
            return value if integer else float(value)
        return default

    def config(self, raw: object) -> Config:
        if raw is None:
            self.issue("", "the file is empty; expected a mapping with 'upstreams' and 'routes'")
        top = self.section(raw, "", Config, "upstreams", "routes") if raw is not None else {}
        server = self.section(_optional(top.get("server")), "server", ServerSettings)
        max_body = self.number(server, "max_body_bytes", "server", _SERVER.max_body_bytes, "count")
        budget = self.number(server, "retry_budget", "server", _SERVER.retry_budget, "non-negative")
        upstreams = self.upstreams(top.get("upstreams"))
        return Config(
            server=ServerSettings(
                max_body_bytes=int(max_body),
                body_timeout=self.number(
                    server, "body_timeout", "server", _SERVER.body_timeout, "positive"
                ),
                max_inflight=self.optional_int(server, "max_inflight", "server"),
                drain_seconds=self.number(
                    server, "drain_seconds", "server", _SERVER.drain_seconds, "non-negative"
                ),
                retry_budget=budget,
                keepalive_seconds=self.optional_seconds(server, "keepalive_seconds", "server")
                if "keepalive_seconds" in server
                else _SERVER.keepalive_seconds,
                **self.metrics(server),
            ),
            upstreams=upstreams,
            routes=self.routes(top.get("routes")),
            pricing=self.pricing(top.get("pricing")),
            source=self.source,
        )

    def metrics(self, server: _Data) -> _MetricsSettings:
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
            self.issue(url_path, f"{problem}, got {self.shown(url_path, url, bare=True)}")
        mode = self.string(data, "stream_options", path) or "auto"
        if mode not in STREAM_OPTIONS_MODES:
            mode_path = child_path(path, "stream_options")
            got = self.shown(mode_path, mode, bare=True)
            self.issue(mode_path, f"expected one of auto, pass, strip, got {got}")
        tpath = child_path(path, "timeouts")
        timeouts = self.section(_optional(data.get("timeouts")), tpath, Timeouts)
        api_key = self.string(data, "api_key", path, empty=True, secret=True)
        pool = self.number(data, "max_connections", path, _UP.max_connections, "count")
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
        )

    def cooldown(self, raw: object, path: str) -> Cooldown:
        data = self.section(raw, path, Cooldown)
        return Cooldown(
            failures=int(self.number(data, "failures", path, _UP.cooldown.failures, "count")),
            seconds=self.number(data, "seconds", path, _UP.cooldown.seconds, "non-negative"),
        )

    def optional_seconds(self, data: _Data, key: str, path: str) -> float | None:
        if data.get(key) is None:
            return None
        return self.number(data, key, path, 1.0, "positive")

    def optional_int(self, data: _Data, key: str, path: str) -> int | None:
        if data.get(key) is None:
            return None
        return int(self.number(data, key, path, 1, "count"))

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
            self.issue(spath, f"expected one of weighted, least_inflight, got {got}")
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
            hedge_after=self.optional_seconds(data, "hedge_after", path),
        )

    def targets(self, data: _Data, key: str, path: str) -> tuple[Target, ...]:
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


def _optional(value: object) -> object:
    """An optional section left empty (`pricing:`, entries all commented out) reads as null."""
    return {} if value is None else value


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
