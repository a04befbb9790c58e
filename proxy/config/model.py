"""The config's types: frozen dataclasses, the Secret wrapper, and the config error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal


class Secret:
    """An API key that cannot leak through repr, str, f-strings or a logged Config."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self._value == other._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0  # TCP connect, and waiting for a pooled connection
    read: float = 30.0  # request sent → response headers
    idle: float | None = None  # longest silence inside a body; None: same as read
    total: float | None = None  # the whole non-stream exchange; None: unbounded

    @property
    def body_idle(self) -> float:
        return self.read if self.idle is None else self.idle


@dataclass(frozen=True, slots=True)
class Cooldown:
    failures: int = 3  # consecutive failed attempts that take an upstream out
    seconds: float = 30.0  # then one probe request decides whether it is back


@dataclass(frozen=True, slots=True)
class UsageHeaders:
    prompt_tokens: str | None = None  # header names, lower-cased
    completion_tokens: str | None = None


StreamOptionsMode = Literal["auto", "pass", "strip"]
Strategy = Literal["weighted", "least_inflight", "fastest"]
STRATEGIES: dict[str, Strategy] = {
    "weighted": "weighted",
    "least_inflight": "least_inflight",
    "fastest": "fastest",
}
# How a Responses API request reaches the upstream: relayed as it is, or translated to chat.
ResponsesMode = Literal["native", "chat"]
RESPONSES_MODES: dict[str, ResponsesMode] = {"native": "native", "chat": "chat"}
STREAM_OPTIONS_MODES: dict[str, StreamOptionsMode] = {
    "auto": "auto",
    "pass": "pass",
    "strip": "strip",
}


@dataclass(frozen=True, slots=True)
class Tls:
    """How an https:// upstream's certificate is checked, and the client certificate (mTLS)."""

    ca_file: str | None = None  # PEM bundle trusted for this upstream, in place of the default
    verify: bool = True  # False: any certificate is accepted (warned at start-up and by check)
    cert_file: str | None = None  # PEM client certificate, for upstreams that require one
    key_file: str | None = None  # its private key; None: cert_file holds it too


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str  # http(s), no trailing "/"
    api_key: Secret | None = None  # local upstreams (vLLM, the demo) may need none
    stream_options: StreamOptionsMode = "auto"
    usage_headers: UsageHeaders = UsageHeaders()
    timeouts: Timeouts = Timeouts()
    max_connections: int = 1000
    cooldown: Cooldown = Cooldown()
    # An answer read whole (JSON, embeddings, an error) past this is not read on: a 502.
    max_response_bytes: int = 64 * 1024 * 1024
    tls: Tls = Tls()
    proxy: Secret | None = None  # an http:// CONNECT proxy URL; it may hold user:password
    responses: ResponsesMode = "native"  # POST /v1/responses: relayed, or translated to chat


@dataclass(frozen=True, slots=True)
class Outliers:
    """A target whose first tokens stay far slower than its peers' is ejected (any strategy)."""

    factor: float | None = 5.0  # its mean TTFT over the best peer's; None: never eject
    min_samples: int = 20  # of its own, before it can be judged
    seconds: float = 30.0  # then it is probed: its first sample decides whether it stays


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str
    model: str
    weight: float = 1.0
    first_token_timeout: float | None = None  # overrides the route's for this target


@dataclass(frozen=True, slots=True)
class Route:
    model: str  # the name clients send
    targets: tuple[Target, ...]
    fallbacks: tuple[Target, ...] = ()
    first_token_timeout: float | None = None  # to the first content event, then next candidate
    strategy: Strategy = "weighted"
    retries: int = 2  # extra attempts after one pass over targets and fallbacks
    # start the next candidate in parallel after this long; "auto": from live TTFT
    hedge_after: float | Literal["auto"] | None = None
    outliers: Outliers = Outliers()


@dataclass(frozen=True, slots=True)
class Price:  # USD per million tokens
    input: float
    output: float
    cached_input: float


BudgetPeriod = Literal["day", "month", "total"]  # day and month: UTC calendar
BUDGET_PERIODS: dict[str, BudgetPeriod] = {"day": "day", "month": "month", "total": "total"}
OnUnavailable = Literal["open", "closed"]
ON_UNAVAILABLE: dict[str, OnUnavailable] = {"open": "open", "closed": "closed"}


@dataclass(frozen=True, slots=True)
class Budget:
    usd: float  # what the key may spend in one period
    period: BudgetPeriod


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A client's key, as stored: its SHA-256 only (`sluicegate hash-key` prints one)."""

    name: str  # shows in metrics and the access log; the key itself never does
    sha256: str  # lower-case hex
    models: tuple[str, ...] | None = None  # route models it may use; None: every route
    rpm: int | None = None  # requests per minute (per process without `state.url`)
    tpm: int | None = None  # tokens per minute (per process without `state.url`)
    budget: Budget | None = None  # USD per period, checked before a request goes upstream

    @property
    def limited(self) -> bool:
        """Whether admission needs the state store for this key."""
        return self.rpm is not None or self.tpm is not None or self.budget is not None


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where limits, budgets and upstream health are kept. No `url`: in this process only
    (exact for one process; N processes grant N times a limit)."""

    url: Secret | None = None  # redis:// or rediss://, from the environment (it holds a password)
    key_prefix: str = "sluicegate:"  # lets several deployments share one Redis
    on_unavailable: OnUnavailable = "open"  # admit on local state, or refuse keyed requests
    timeout: float = 0.05  # seconds for one state call before it counts as unavailable


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client may take to send its request body
    max_echoed_chars: int = 200  # of a client's string quoted in an error or a log line
    # An open proxy refuses requests from web pages of other origins than these (scheme://host
    # [:port], lower-case); allowed_hosts: the Host names served (DNS rebinding); None: any.
    cors_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] | None = None
    max_inflight: int | None = None  # per process; beyond it, 429 with Retry-After
    # Stream bytes held before the first token (comments, one huge event); past it the
    # attempt fails as `too_large` and the next candidate is tried.
    max_event_bytes: int = 4 * 1024 * 1024
    # What a client connection may take before its request is read (proxy.connection); read
    # at start-up, like the metrics settings.
    max_header_bytes: int = 32 * 1024  # request line and headers; past it, 431
    header_timeout: float = 10.0  # seconds from connecting to the end of the headers; then 408
    max_connections: int | None = None  # per process; None: half the open-file limit
    drain_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    retry_budget: float = 0.2  # re-attempts on an upstream, as a share of its recent requests
    keepalive_seconds: float | None = 15.0  # a stream waiting this long for its first token
    # gets response headers and then an SSE comment every as long; None: never
    finish_after_abort: float | None = None  # a client that leaves: None closes the upstream
    # at once (usage estimated); seconds: read the answer to its end, so usage is reported
    # /metrics on a listener of its own (`serve --metrics-port/--metrics-host` win over these);
    # None: on the main port. Read at start-up: a reload that changes them logs restart_needed.
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: the main listener's --host
    metrics_token: Secret | None = None  # /metrics then needs `Authorization: Bearer <token>`


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    pricing: Mapping[str, Price]
    source: str
    keys: tuple[ClientKey, ...] = ()  # none: the proxy is open to any client
    state: StateSettings = StateSettings()
    # Accepted, but worth a word (`check` prints them, serve and reload log them).
    warnings: tuple[ConfigIssue, ...] = field(default=(), init=False, compare=False)
    _by_model: Mapping[str, Route] = field(init=False, repr=False, compare=False)
    _by_hash: Mapping[str, ClientKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read-only even when built by hand (tests, tools), not only through parse_config.
        object.__setattr__(self, "upstreams", MappingProxyType(dict(self.upstreams)))
        object.__setattr__(self, "pricing", MappingProxyType(dict(self.pricing)))
        object.__setattr__(self, "routes", tuple(self.routes))
        index: dict[str, Route] = {}
        for route in self.routes:
            index.setdefault(route.model, route)
        object.__setattr__(self, "_by_model", MappingProxyType(index))
        object.__setattr__(self, "keys", tuple(self.keys))
        hashes = {key.sha256: key for key in reversed(self.keys)}
        object.__setattr__(self, "_by_hash", MappingProxyType(hashes))

    def route(self, model: str) -> Route | None:
        return self._by_model.get(model)

    def key(self, sha256: str) -> ClientKey | None:
        return self._by_hash.get(sha256)

    def summary(self) -> str:
        counts = zip((self.upstreams, self.routes, self.pricing), _NOUNS, strict=True)
        text = f"{self.source}: " + ", ".join(
            f"{len(items)} {noun}{'' if len(items) == 1 else 's'}" for items, noun in counts
        )
        keys = len(self.keys)
        text += f", {keys} client key{'' if keys == 1 else 's'}" if keys else ", open"
        return text + (", state shared in Redis" if self.state.url is not None else "")


_NOUNS = ("upstream", "route", "priced model")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int | None
    path: str  # "routes[2].fallbacks[0].upstream"; "" for the document root
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(map(str, self.issues)))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[ConfigIssue, ...]]]:
        # Exception pickles its message string by default, which __init__ cannot take back.
        return (ConfigError, (self.issues,))
