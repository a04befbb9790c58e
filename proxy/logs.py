"""Structured logs: one processor chain, with a redaction step before any renderer."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from structlog.types import FilteringBoundLogger

from proxy.record import RequestRecord

LEVELS = {  # `serve --log-level`: the proxy's log lines at this level and above
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_SECRET_KEYS = frozenset({"authorization", "api_key", "apikey", "key", "token", "password"})
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Masks values under secret-looking keys and bearer tokens inside strings."""
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(value, str) and "earer" in value:
            event[key] = _BEARER.sub(r"\1***", value)
    return event


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """JSON lines by default; human-readable when stderr is a terminal (or json=False)."""
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stderr.buffer)
            if as_json
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )


def get_logger() -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger("sluicegate")
    return logger


def access_log(record: RequestRecord) -> None:
    """One JSON line per request."""
    get_logger().info("request", **record.fields())
