"""Wiring: the Starlette application, its lifespan, and the small endpoints."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.chat import ChatCompletions
from proxy.config import load_config
from proxy.errors import MethodNotAllowed, NotFound, ProxyError, error_body
from proxy.logs import access_log, get_logger
from proxy.state import AppState, StateRef
from proxy.upstream import UpstreamClients

CONFIG_ENV = "SLUICEGATE_CONFIG"
log = get_logger()


def create_app(
    config_path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Starlette:
    """The proxy for one config file; the file is read at start-up (lifespan)."""
    ref = StateRef()
    path = Path(config_path)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        config = load_config(path, env)
        clients = UpstreamClients(config.upstreams)
        ref.current = AppState(config=config, clients=clients)
        log.info("ready", config=config.summary())
        try:
            yield
        finally:
            ref.current = None
            await clients.aclose()

    async def models(_request: Request) -> Response:
        state = ref.get()
        data = [
            {"id": r.model, "object": "model", "created": 0, "owned_by": "sluicegate"}
            for r in state.config.routes
        ]
        return _json(200, {"object": "list", "data": data})

    async def healthz(_request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(_request: Request) -> Response:
        if ref.current is None:
            return _json(503, {"status": "not ready"})
        return _json(200, {"status": "ready"})

    routes = [
        Route("/v1/chat/completions", ChatCompletions(ref, access_log), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            ProxyError: _proxy_error,
            Exception: _crash,
        },
    )


def create_app_from_env() -> Starlette:
    """Factory for `uvicorn --factory` in multi-worker mode: the CLI passes the path."""
    return create_app(os.environ.get(CONFIG_ENV, "routes.yaml"))


def _json(status: int, payload: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 405:
        error = MethodNotAllowed("method not allowed for this path")
    else:
        error = NotFound("no such path; this proxy serves /v1/chat/completions and /v1/models")
    return Response(error.body(), error.status, exc.headers, media_type="application/json")


async def _proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return Response(exc.body(), exc.status, media_type="application/json")


async def _crash(_request: Request, exc: Exception) -> Response:
    log.error("unhandled_error", exc_info=exc)
    body = error_body("internal proxy error", "server_error", code="internal_error")
    return Response(body, 500, media_type="application/json")
