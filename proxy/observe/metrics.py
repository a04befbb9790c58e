"""Prometheus metrics: the observer that turns each finished request's record into series.

The only importer of prometheus_client. Metric names and labels are a public contract (the
Grafana dashboard and the alert rules read them). Every label value is a config value or a
fixed word: anything else collapses to `_other`, so client input cannot grow the series count.
`key` is a client key's configured name, `_none` without keys or before a key was accepted.

Several workers: `metrics_server.prepare_multiprocess_dir()` runs in the supervisor before
the workers start; each worker then imports prometheus_client with PROMETHEUS_MULTIPROC_DIR
set, writes its values to files there, and any worker's `render()` adds up every worker's
files (as does `render_workers()` in the supervisor, for the listener of `--metrics-port`).
"""

from __future__ import annotations

import math
import os
from typing import Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from proxy.config import Config
from proxy.latency import REASON as EJECT_REASON
from proxy.observe.logs import get_logger
from proxy.observe.refusals import REASONS as REFUSAL_REASONS
from proxy.observe.words import OTHER, Series, Words
from proxy.record import AttemptOutcome, RequestRecord, UsageSource

# `_created` samples double the series count, and multiprocess mode has none: without them
# the exposition looks the same with one worker or many.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

# What generate_latest writes. Spelled out: newer clients' CONTENT_TYPE_LATEST claims 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "_unknown"  # no route matched (bad JSON, unknown model, …); stream not known
NONE = "_none"  # no upstream or model was involved

# Time to first token: from fast cached answers (~50 ms) to long reasoning waits (30 s).
_SUB_SECOND = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75)
TTFT_BUCKETS = (*_SUB_SECOND, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30)
# Whole requests: streamed answers run for minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_TYPES = ("input", "cached_input", "output", "reasoning")

_OUTCOMES = frozenset(get_args(AttemptOutcome))
_SOURCES = frozenset(get_args(UsageSource))
EXTRA_OBSERVER = "extra"  # the observers an embedder passes to create_app
_OBSERVERS = frozenset({"metrics", "access_log", EXTRA_OBSERVER})
_REFUSALS = frozenset(REFUSAL_REASONS)
_STREAM = {True: "true", False: "false", None: UNKNOWN}
_PERIODS = frozenset({"day", "month", "total"})


def _known(value: str | None, known: set[str] | frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in known else OTHER


class Metrics:
    """One per worker process, alive across config reloads (counters must not restart)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self._multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if self._multiproc_dir and not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client picks its storage once, when first imported.
            raise RuntimeError("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client loaded")
        self.registry = CollectorRegistry() if registry is None else registry
        self._routes: set[str] = set()
        self._upstreams: set[str] = set()
        self._models: set[str] = set()
        self._keys: set[str] = set()  # client key names
        self._timed: set[tuple[str, str]] = set()  # targets with latency series
        self._fallback_reasons = Words(seed=_OUTCOMES)
        self._stream_errors = Words()
        self._warned_unpriced: set[str] = set()
        self._warned_errors: set[type[BaseException]] = set()
        self._shared_state = config.state.url is not None  # read at start-up, as the store is
        self._define(self.registry)
        self._learn(config)

    def _define(self, r: CollectorRegistry) -> None:
        ident = ("route", "upstream", "model")

        def counted(name: str, doc: str, labels: tuple[str, ...]) -> Series[Counter]:
            return Series(Counter(name, doc, labels, registry=r))

        self._requests = counted(
            "sluicegate_requests_total", "Requests answered.", (*ident, "stream", "status", "key")
        )
        self._tokens = counted(
            "sluicegate_tokens_total",
            "Tokens used, by non-overlapping type.",
            (*ident, "type", "usage_source", "key"),
        )
        self._cost = counted("sluicegate_cost_usd_total", "Cost in USD.", (*ident, "key"))
        self._unpriced = counted(
            "sluicegate_unpriced_tokens_total",
            "Tokens of models without a price in the config.",
            ("upstream", "model"),
        )
        self._ttft = Series(
            Histogram(
                "sluicegate_time_to_first_token_seconds",
                "Arrival to the first content byte sent to the client.",
                ident,
                buckets=TTFT_BUCKETS,
                registry=r,
            )
        )
        self._duration = Series(
            Histogram(
                "sluicegate_request_duration_seconds",
                "Arrival to the end of the response.",
                (*ident, "stream"),
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self._attempts = counted(
            "sluicegate_upstream_attempts_total",
            "Upstream attempts, by outcome.",
            ("upstream", "outcome"),
        )
        self._fallbacks = Counter(
            "sluicegate_fallbacks_total",
            "Answers that came from other than the first pick.",
            ("route", "from_upstream", "to_upstream", "reason"),
            registry=r,
        )
        self._stream_errors_total = Counter(
            "sluicegate_stream_errors_total",
            "Committed streams cut short.",
            ("route", "upstream", "reason"),
            registry=r,
        )
        self._inflight = Series(
            Gauge(
                "sluicegate_inflight_requests",
                "Routed requests in progress.",
                ("route",),
                multiprocess_mode="livesum",
                registry=r,
            )
        )
        self._reloads = Counter(
            "sluicegate_config_reloads_total", "Config reloads.", ("result",), registry=r
        )
        self._cooldown = Gauge(
            "sluicegate_upstream_cooldown",
            "1 while the upstream is in cooldown (in any worker).",
            ("upstream",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self._target_ttft = Series(
            Gauge(
                "sluicegate_upstream_ttft_seconds",
                "Smoothed time to first token per 1k prompt tokens (at least 1k), "
                "as routing reads it.",
                ("upstream", "model"),
                multiprocess_mode="livemax",
                registry=r,
            )
        )
        self._ejected = Gauge(
            "sluicegate_upstream_ejected",
            "1 while the target is ejected as an outlier (in any worker), by reason.",
            ("upstream", "model", "reason"),
            multiprocess_mode="livemax",
            registry=r,
        )
        self._observer_errors = Counter(
            "sluicegate_observer_errors_total",
            "Failures inside request observers.",
            ("observer",),
            registry=r,
        )
        self._refused = Counter(
            "sluicegate_connections_refused_total",
            "Client connections answered and closed before a request reached the app.",
            ("reason",),
            registry=r,
        )
        self._define_state(r)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)
        for result in ("ok", "error"):
            self._reloads.labels(result)
        for observer in sorted(_OBSERVERS):
            self._observer_errors.labels(observer)

    def _define_state(self, r: CollectorRegistry) -> None:
        # Spend read from a shared store is the same in every worker (max); kept in each
        # process, each worker's is its own share (sum).
        spend_mode: Literal["livemax", "livesum"] = "livemax" if self._shared_state else "livesum"
        self._state_up = Gauge(
            "sluicegate_state_up",
            "1 while the state store answers (always 1 in-process; any worker down: 0).",
            multiprocess_mode="livemin",
            registry=r,
        )
        self._state_errors = Counter(
            "sluicegate_state_errors_total",
            "State store calls that failed or timed out.",
            registry=r,
        )
        self._spend = Gauge(
            "sluicegate_key_spend_usd",
            "USD a client key has spent in its current budget period (day without a budget).",
            ("key", "period"),
            multiprocess_mode=spend_mode,
            registry=r,
        )
        self._budget = Gauge(
            "sluicegate_key_budget_usd",
            "A client key's configured budget per period.",
            ("key",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self._state_up.set(1)
        self._state_errors.inc(0)

    def _learn(self, config: Config) -> None:
        """Adds a config's names to the known label values. The sets only grow: requests that
        started on the previous config still finish with its names after a reload."""
        self._routes.update(route.model for route in config.routes)
        self._upstreams.update(config.upstreams)
        targets = [t for route in config.routes for t in (*route.targets, *route.fallbacks)]
        self._models.update(t.model for t in targets)
        self._keys.update(key.name for key in config.keys)
        for key in config.keys:
            if key.budget is not None:
                self._budget.labels(key.name).set(key.budget.usd)
        # Series that alerts compare over time start at 0, so their first increase is seen.
        for route in config.routes:
            self._inflight.labels(route.model)
        for upstream in config.upstreams:
            self._cooldown.labels(upstream)
        for pair in {(t.upstream, t.model) for t in targets} - self._timed:
            self._timed.add(pair)  # no samples yet: NaN, not a first-token time of 0
            self._target_ttft.labels(*pair).set(math.nan)
            self._ejected.labels(*pair, EJECT_REASON).set(0)
        for t in targets:
            if t.model not in config.pricing:
                self._unpriced.labels(t.upstream, t.model)

    # --- the pipeline's calls ------------------------------------------------------------

    def request_started(self, route: str | None) -> None:
        """Call with `record.route` as soon as it is set; requests that never get a route are
        not counted in flight (request_finished pairs on `record.route` being set)."""
        if route is not None:
            self._inflight.labels(_known(route, self._routes)).inc()

    def request_finished(self, record: RequestRecord) -> None:
        """The observer: never raises (a failure is counted and logged once per kind)."""
        try:
            self._observe(record)
        except Exception as exc:  # an observer must not break the request it watches
            self.observer_failed("metrics")
            if type(exc) not in self._warned_errors:
                self._warned_errors.add(type(exc))
                get_logger().exception("metrics_observer_failed", request_id=record.request_id)

    def observer_failed(self, observer: str) -> None:
        """`Observers.failed`: counts an observer's failure ("access_log", "metrics", "extra")."""
        self._observer_errors.labels(_known(observer, _OBSERVERS)).inc()

    def connection_refused(self, reason: str) -> None:
        """`proxy.observe.refusals`: a connection refused by a `server.` limit."""
        self._refused.labels(_known(reason, _REFUSALS)).inc()

    def config_reloaded(self, ok: bool, config: Config | None = None) -> None:
        """After a reload attempt; pass the new config on success so its names are known."""
        if ok and config is not None:
            self._learn(config)
        self._reloads.labels("ok" if ok else "error").inc()

    def state_changed(self, up: bool, _why: str = "") -> None:
        self._state_up.set(1 if up else 0)

    def state_failed(self) -> None:
        self._state_errors.inc()

    def set_spend(self, spend: dict[str, float], periods: dict[str, str]) -> None:
        """USD per key name, read from the store; `periods`: each key's period word."""
        for name, usd in spend.items():
            self._spend.labels(_known(name, self._keys), _known(periods[name], _PERIODS)).set(usd)

    def set_cooldown(self, upstream: str, active: bool) -> None:
        self._cooldown.labels(_known(upstream, self._upstreams)).set(1 if active else 0)

    def set_ttft(self, upstream: str, model: str, seconds: float) -> None:
        self._target_ttft.labels(*self._target(upstream, model)).set(seconds)

    def set_ejected(self, upstream: str, model: str, active: bool) -> None:
        labels = (*self._target(upstream, model), EJECT_REASON)
        self._ejected.labels(*labels).set(1 if active else 0)

    def _target(self, upstream: str, model: str) -> tuple[str, str]:
        return _known(upstream, self._upstreams), _known(model, self._models)

    def render(self) -> tuple[bytes, str]:
        """The exposition for GET /metrics: its body and content type."""
        if self._multiproc_dir:
            return render_workers(self._multiproc_dir)
        return generate_latest(self.registry), CONTENT_TYPE

    # --- one record ----------------------------------------------------------------------

    def _identity(self, record: RequestRecord) -> tuple[str, str, str]:
        if record.route is None:
            return UNKNOWN, NONE, NONE
        return (
            _known(record.route, self._routes),
            _known(record.upstream, self._upstreams),
            _known(record.model, self._models),
        )

    def _observe(self, record: RequestRecord) -> None:
        ident = route, upstream, _ = self._identity(record)
        if record.route is not None:
            self._inflight.labels(route).dec()
        stream = _STREAM.get(record.stream, OTHER)
        status = str(record.status) if 100 <= record.status <= 599 else OTHER
        key = _known(record.key_name, self._keys)
        self._requests.labels(*ident, stream, status, key).inc()
        self._duration.labels(*ident, stream).observe(max(record.duration_s, 0.0))
        if record.ttft_s is not None:
            self._ttft.labels(*ident).observe(max(record.ttft_s, 0.0))
        self._count_usage(record, ident, key)
        for attempt in record.attempts:
            self._attempts.labels(
                _known(attempt.upstream, self._upstreams), _known(attempt.outcome, _OUTCOMES)
            ).inc()
        if record.fallback_reason:
            first = record.attempts[0].upstream if record.attempts else None
            self._fallbacks.labels(
                route,
                _known(first, self._upstreams),
                upstream,
                self._fallback_reasons(record.fallback_reason),
            ).inc()
        if record.stream_error:
            reason = self._stream_errors(record.stream_error)
            self._stream_errors_total.labels(route, upstream, reason).inc()

    def _count_usage(self, record: RequestRecord, ident: tuple[str, str, str], key: str) -> None:
        usage = record.usage
        if usage is None:
            return
        source = _known(usage.source, _SOURCES)
        counts = (usage.input, usage.cached_input, usage.output, usage.reasoning)
        for kind, count in zip(TOKEN_TYPES, counts, strict=True):
            self._tokens.labels(*ident, kind, source, key).inc(max(count, 0))
        if record.cost_usd is not None:
            self._cost.labels(*ident, key).inc(max(record.cost_usd, 0.0))
        elif sum(counts) > 0:
            _, upstream, model = ident
            self._unpriced.labels(upstream, model).inc(sum(counts))
            if model not in self._warned_unpriced:
                self._warned_unpriced.add(model)
                get_logger().warning(
                    "unpriced_model",
                    upstream=upstream,
                    model=model,
                    hint="add it under `pricing:` in the routes file",
                )


def render_workers(path: str) -> tuple[bytes, str]:
    """The exposition of every worker's values in multiprocess directory `path`: what any
    worker's `render()` answers, and what the supervisor serves on `--metrics-port`."""
    registry = CollectorRegistry()
    # prometheus_client leaves this constructor unannotated.
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE


def mark_process_dead(pid: int) -> None:
    """Call in the supervisor when worker `pid` exits, so its in-flight count and cooldown
    flags ("live" gauges) stop counting; its counters stay in the totals. No-op with one
    process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # unannotated
