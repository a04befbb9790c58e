"""What one request did, written by the pipeline and read by observers (logs, metrics).

Every label-like field holds a config value (route, upstream and model as configured) or a
fixed word; raw client input never lands here except the request id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

UsageSource = Literal["reported", "header", "estimated"]

# Outcomes of one upstream attempt (fixed words: they become metric label values).
AttemptOutcome = Literal[
    "ok",  # committed: its answer went to the client
    "connect_error",
    "tls_error",  # the upstream's certificate failed verification, or the handshake failed
    "timeout",  # no response headers in time
    "first_token_timeout",  # headers came, content did not
    "reset",  # the connection dropped before the answer was committed
    "status_429",
    "status_auth",  # 401/403/404 from the upstream: its key or model is wrong
    "status_4xx",
    "untranslatable",  # a Responses request this `responses: chat` upstream cannot take
    "stream_error",  # an error event in place of the answer
    "too_large",  # past max_response_bytes, or max_event_bytes held before the first token
    "status_5xx",
    "stream_options_rejected",
    "hedge_lost",  # another attempt produced content first
    "cancelled",  # the client left
    "skipped_cooldown",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts that never overlap: their sum is every token the request used."""

    input: int = 0  # prompt tokens not served from cache
    cached_input: int = 0
    output: int = 0  # completion tokens that are not reasoning
    reasoning: int = 0
    source: UsageSource = "reported"

    @property
    def completion(self) -> int:
        return self.output + self.reasoning

    @property
    def prompt(self) -> int:
        return self.input + self.cached_input


@dataclass(frozen=True, slots=True)
class Attempt:
    upstream: str
    model: str
    outcome: AttemptOutcome
    seconds: float = 0.0


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    status: int = 0
    route: str | None = None  # the route's configured model name
    upstream: str | None = None  # the upstream whose answer the client got (or the last tried)
    model: str | None = None  # that upstream's model, as configured
    stream: bool | None = None
    error: str | None = None  # our error code when the request failed
    message: str | None = None
    stream_error: str | None = None  # why a committed stream was cut short
    client_disconnected: bool = False
    duration_s: float = 0.0
    ttft_s: float | None = None  # arrival → first content byte sent to the client
    usage: Usage | None = None
    cost_usd: float | None = None  # None: the model has no price (counted as unpriced)
    attempts: list[Attempt] = field(default_factory=list)
    fallback_reason: str | None = None  # why the answer came from other than the first pick
    api: str = "chat"  # chat, completions, embeddings
    key_name: str | None = None  # the client key's configured name, when keys are configured
    should_retry: bool | None = None  # False: the error answer carried `x-should-retry: false`

    def fail(self, status: int, code: str | None, message: str) -> None:
        self.status, self.error, self.message = status, code, message

    def fields(self) -> dict[str, object]:
        """Every field that is set, for the access log."""
        return {name: v for name in _RECORD_FIELDS if (v := getattr(self, name)) is not None}


_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


Observer = Callable[[RequestRecord], None]


def _uncounted(_name: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Observers:
    """Who hears about requests, each under a name. `started(route)` is called exactly when a
    request gets a route (so `record.route` is set at `finished`); `finished(record)` for every
    request. Observers watch: a failing one never breaks a request, and its name is handed to
    `failed` (the metrics count it in sluicegate_observer_errors_total{observer})."""

    on_start: tuple[tuple[str, Callable[[str], None]], ...] = ()
    on_finish: tuple[tuple[str, Observer], ...] = ()
    failed: Callable[[str], None] = _uncounted
    drain: Callable[[], None] = lambda: None  # runs what observers queued (proxy.observe.batch)

    def started(self, route: str) -> None:
        for name, observe in self.on_start:
            try:
                observe(route)
            except Exception:  # observers never steer
                self.failed(name)

    def finished(self, record: RequestRecord) -> None:
        for name, observe in self.on_finish:
            try:
                observe(record)
            except Exception:  # observers never steer
                self.failed(name)
