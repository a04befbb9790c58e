"""Wiring: the Starlette application, its lifespan, and the small endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy.admission import identify
from proxy.api_request import APIS
from proxy.asgi import escaped, send_body, send_error
from proxy.catalog import model_entries, model_entry
from proxy.config import Config, ConfigError
from proxy.cors import granted, granting, preflight
from proxy.endpoint import ApiEndpoint
from proxy.errors import (
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    NotReady,
    ProxyError,
    error_body,
)
from proxy.fleet import Fleet, open_fleet
from proxy.health import Health
from proxy.metering.estimate import tokenizer_available
from proxy.metering.usage import may_estimate
from proxy.observe.batch import BATCHED, Batched
from proxy.observe.logs import LEVELS, access_log, get_logger, lines_held
from proxy.observe.logs import configure as configure_logs
from proxy.observe.metrics import EXTRA_OBSERVER, Metrics
from proxy.observe.metrics_server import MetricsEndpoint, restart_needed
from proxy.observe.refusals import refusal_state
from proxy.origin import UNCHECKED_HOST_PATHS, check_host
from proxy.playground import playground
from proxy.record import Observer, Observers
from proxy.reload import POLL_SECONDS, Reloader
from proxy.retrieval import RetrievalEndpoint
from proxy.state import Runtime, StateRef

CONFIG_ENV = "SLUICEGATE_CONFIG"
# Refuse what no client of an LLM API sends (their bytes are capped as they arrive, in
# proxy.connection, by server.max_header_bytes).
MAX_HEADERS = 100
# The cyclic GC: young collections every 10,000 new containers, not 700 (a request in flight
# holds ~180; 10,000 take ~1 ms to walk); the middle generation, where in-flight requests'
# objects end up, after 100 of them, not 10 (one walk took ~40 ms of a 1,000-stream burst,
# and a request leaves no cyclic garbage to find: bench/PROFILE.md, tests/test_lifecycle.py).
GC_THRESHOLDS = (10_000, 100, 10)
NO_SUCH_PATH = (
    "no such path; this proxy serves /v1/chat/completions, /v1/completions, /v1/responses, "
    "/v1/responses/{id}, /v1/embeddings, /v1/models and /v1/models/{model} (and each "
    "without /v1)"
)
WATCH_ENV = "SLUICEGATE_WATCH"
METRICS_ROUTE_ENV = "SLUICEGATE_METRICS_ROUTE"  # "0": /metrics is on the metrics listener
LOG_LEVEL_ENV = "SLUICEGATE_LOG_LEVEL"  # a name in proxy.logs.LEVELS
log = get_logger()


def create_app(
    config_path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    watch_interval: float | None = POLL_SECONDS,
    runtime: Runtime | None = None,
    observers: Sequence[Observer] = (),
    metrics_route: bool = True,
) -> Starlette:
    """The proxy for one config file; the file is read at start-up and watched for edits.

    `observers` hear about every finished request, after the built-in ones (a test seam,
    and a hook for embedding); their failures are counted as `observer="extra"`.
    `metrics_route=False`: /metrics is served elsewhere (see proxy.observe.metrics_server;
    `app.state.render_metrics` renders it), and is 404 here."""
    ref = StateRef()
    runtime = runtime or Runtime(health=Health())
    metrics: list[Metrics] = []  # the one per process, made when the config is first read
    started: list[Config] = []  # as read at start-up; metrics settings and `state:` stay so
    scrape = MetricsEndpoint(functools.partial(_render, metrics, runtime))  # token: at start-up

    def reloaded(ok: bool, error: ConfigError | None) -> None:
        config = ref.get().config
        for meter in metrics:
            meter.config_reloaded(ok, config if ok else None)
        if ok:
            log.info("config_reloaded", config=config.summary())
            _log_warnings(config)
            _warn_restart_needed(started, config)
        else:
            log.error(
                "config_reload_refused", errors=[str(i) for i in error.issues] if error else []
            )

    reloader = Reloader(Path(config_path), env, ref, runtime, reloaded)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        state = reloader.start()
        meter = Metrics(state.config)
        started.append(state.config)
        scrape.token = state.config.server.metrics_token  # before /metrics can answer
        metrics.append(meter)
        _watch_upstreams(runtime, meter)
        runtime.observers = _observers(meter, observers)
        await _before_serving(state.config)
        fleet = await _open_fleet(runtime, ref, meter)  # its first calls wait on nothing above
        log.info("ready", config=state.config.summary())
        _log_warnings(state.config)
        if not state.config.keys:
            log.warning("open_proxy", hint="no `keys:` in the routes file: any client is served")
        reloader.install_sighup()
        _drain_on_sigterm(runtime)
        watcher = asyncio.ensure_future(reloader.watch(watch_interval)) if watch_interval else None
        try:
            yield refusal_state(meter.connection_refused)  # for proxy.connection's refusals
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            runtime.observers.drain()
            await fleet.aclose()
            await reloader.aclose()

    # Each API at /v1/... and, for a base_url without /v1 (as LiteLLM serves them), at /...
    endpoints = {
        served: ApiEndpoint(ref, runtime, api) for path, api in APIS.items() for served in v1(path)
    }
    routes = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in endpoints.items()),
        *([Route("/metrics", scrape, methods=["GET"])] if metrics_route else []),
        *(
            Route(path, RetrievalEndpoint(ref, runtime), methods=_RETRIEVAL)
            for path in v1("/v1/responses/{rest:path}")
        ),
        *_small_routes(ref, runtime),
    ]
    app = _Proxy(
        endpoints,
        ref,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            ProxyError: _proxy_error,
            Exception: _crash,
        },
    )
    app.state.runtime = runtime
    app.state.reloader = reloader
    app.state.render_metrics = scrape.render
    return app


def _observers(meter: Metrics, extra: Sequence[Observer]) -> Observers:
    """The access log and the metrics in batches (proxy.observe.batch); `extra` at once."""
    observing = (("access_log", access_log), ("metrics", meter.request_finished))
    batched = Batched(observing, meter.observer_failed, lines_held)
    return Observers(
        on_start=(("metrics", meter.request_started),),
        on_finish=(
            (BATCHED, batched),  # never raises: it counts its observers' failures itself
            *((EXTRA_OBSERVER, observer) for observer in extra),
        ),
        failed=meter.observer_failed,
        drain=batched.drain,
    )


def _watch_upstreams(runtime: Runtime, meter: Metrics) -> None:
    """Cooldowns, smoothed first-token times and ejections show on /metrics. These hooks run
    inside an attempt, so a failing one is caught and counted like any observer's."""
    runtime.health.on_cooldown = _guarded(meter.set_cooldown, meter)
    runtime.latency.on_ttft = _guarded(meter.set_ttft, meter)
    runtime.latency.on_eject = _guarded(meter.set_ejected, meter)


def _guarded(hook: Callable[..., None], meter: Metrics) -> Callable[..., None]:
    def observe(*args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # observers never steer
            meter.observer_failed("metrics")

    return observe


async def _open_fleet(runtime: Runtime, ref: StateRef, meter: Metrics) -> Fleet:
    """The state store (kept across reloads; `state:` is read at start-up) with its
    connections made (now, not within a request's `state.timeout`), shared upstream health,
    and the task that shows each key's spend on /metrics."""
    config = ref.get().config

    def transition(up: bool, why: str) -> None:
        meter.state_changed(up)
        if up:
            log.info("state_restored")
        else:
            log.warning("state_unavailable", error=why, on_unavailable=config.state.on_unavailable)

    if config.state.url is None:
        fleet = Fleet(runtime.store, owners=runtime.owners)
    else:
        fleet = open_fleet(config.state, runtime.health, transition, meter.state_failed)
        runtime.store, runtime.owners = fleet.store, fleet.owners
        await fleet.open()
    fleet.start(lambda: ref.get().config, meter.set_spend)
    return fleet


_RETRIEVAL = ["GET", "DELETE", "POST"]


def _small_routes(ref: StateRef, runtime: Runtime) -> list[Route]:
    """The endpoints off the hot path: model list, probes, the playground."""

    async def models(request: Request) -> Response:
        config = ref.get().config
        key = identify(config, request.scope["headers"])  # with keys, as OpenAI's: 401 without
        return _json(200, {"object": "list", "data": model_entries(config, key)})

    async def healthz(_request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(_request: Request) -> Response:
        if ref.current is None or runtime.draining:
            return _json(503, {"status": "draining" if runtime.draining else "not ready"})
        return _json(200, {"status": "ready"})

    async def model(request: Request) -> Response:
        config = ref.get().config
        key = identify(config, request.scope["headers"])
        return _json(200, model_entry(config, key, request.path_params["model"]))

    return [
        *(Route(path, models, methods=["GET"]) for path in v1("/v1/models")),
        *(Route(path, model, methods=["GET"]) for path in v1("/v1/models/{model:path}")),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/", playground, methods=["GET"]),  # and HEAD
    ]


def v1(path: str) -> tuple[str, str]:
    """A /v1 path and the same path without /v1: clients whose base_url lacks it."""
    return path, path.removeprefix("/v1")


def _render(metrics: list[Metrics], runtime: Runtime) -> tuple[bytes, str]:
    if not metrics:
        raise NotReady("sluicegate is starting")
    runtime.observers.drain()  # this process's counts as of now, not as of the last batch
    return metrics[0].render()


def _log_warnings(config: Config) -> None:
    for warning in config.warnings:
        log.warning("config_warning", issue=str(warning))


def _warn_restart_needed(started: list[Config], now: Config) -> None:
    if not started:
        return
    stale = restart_needed(started[0].server, now.server)
    stale += ["state"] if started[0].state != now.state else []  # the store is built once
    if stale:
        log.warning("restart_needed", settings=stale, hint="they apply at the next start")


def _drain_on_sigterm(runtime: Runtime) -> None:
    """Readiness turns false the moment SIGTERM arrives; the server's own handler (uvicorn's,
    installed before the lifespan runs) then stops accepting and lets in-flight requests
    finish. Only the main thread can touch signal handlers (threaded test servers skip it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: FrameType | None) -> None:
        runtime.draining = True
        log.info("draining")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handle)


class _Proxy(Starlette):
    """Starlette for everything but the hot path: POST to the generation APIs goes straight
    to their raw ASGI endpoints, so no middleware wraps `send` for every streamed chunk."""

    def __init__(self, endpoints: Mapping[str, ApiEndpoint], ref: StateRef, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoints = endpoints
        self._ref = ref

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            await self._http(scope, receive, send)
        except Exception as exc:
            # Answered already (a 500 in OpenAI's shape, or a cut stream). Logged here, once,
            # as a JSON line through the redaction step, not as the server's plain traceback.
            log.error("unhandled_error", exc_info=exc)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        state = self._ref.current
        origins = state.config.server.cors_origins if state is not None else None
        origin = granted(headers, origins) if origins else None  # no CORS config: no cost
        plain, send = send, granting(send, origin) if origin is not None else send
        if len(headers) > MAX_HEADERS:
            await send_error(send, HeadersTooLarge("request headers are too large"))
            return
        if escaped(scope):
            await send_error(send, NotFound(NO_SUCH_PATH))
            return
        if state is not None and scope["path"] not in UNCHECKED_HOST_PATHS:
            try:
                check_host(headers, state.config.server)
            except ProxyError as exc:
                await send_error(send, exc)
                return
        if origin is not None and state is not None and scope["method"] == "OPTIONS":
            await send_body(plain, 204, b"", preflight(headers, origin, state.config))
            return
        endpoint = self._endpoints.get(scope["path"])
        if endpoint is not None and scope["method"] == "POST":
            await endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _before_serving(config: Config) -> None:
    """The tokenizer (~0.5 s, ~60 MB, holding the GIL) loads now only if an upstream may
    need estimates; else never, or lazily (see proxy.metering.estimate). Then everything
    built at start-up (config, modules) moves out of the GC's sight: full collections that
    walk it cost tens of ms of stop-the-world under load."""
    if any(may_estimate(upstream) for upstream in config.upstreams.values()):
        await asyncio.to_thread(tokenizer_available)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app_from_env() -> Starlette:
    """Factory for `uvicorn --factory` in multi-worker mode: the CLI passes the path. A worker
    is a fresh interpreter (uvicorn spawns it), so it sets up its own logs: JSON lines through
    the redaction step, at the level `serve --log-level` was given."""
    configure_logs(level=LEVELS.get(os.environ.get(LOG_LEVEL_ENV, "info"), logging.INFO))
    watch = os.environ.get(WATCH_ENV, "1") == "1"
    return create_app(
        os.environ.get(CONFIG_ENV, "routes.yaml"),
        watch_interval=POLL_SECONDS if watch else None,
        metrics_route=os.environ.get(METRICS_ROUTE_ENV, "1") == "1",
    )


def _json(status: int, payload: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 405:
        error = MethodNotAllowed("method not allowed for this path")
    else:
        error = NotFound(NO_SUCH_PATH)
    return Response(error.body(), error.status, exc.headers, media_type="application/json")


async def _proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return Response(exc.body(), exc.status, media_type="application/json")


async def _crash(_request: Request, _exc: Exception) -> Response:
    """Starlette raises the exception on after this answer; `_Proxy` logs it."""
    body = error_body("internal proxy error", "server_error", code="internal_error")
    return Response(body, 500, {"connection": "close"}, media_type="application/json")
