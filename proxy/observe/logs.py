"""Structured logs: one processor chain, with a redaction step before any renderer (and after
a traceback becomes text, so that text is redacted too)."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, BinaryIO

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
# Names of fields (and of headers in a logged mapping) whose values are masked outright.
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "api_key",
        "apikey",
        "x-api-key",  # Anthropic's key header
        "x-goog-api-key",  # Google's
        "key",
        "token",
        "password",
    }
)
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Masks values under secret-looking keys and bearer tokens inside strings, also inside
    mappings and lists (a logged mapping of headers, say)."""
    for key, value in event.items():  # `_masked` inlined for the flat values of a line
        secret = _SECRET_NAMES.get(key)
        if secret is None:
            secret = _secret_name(key)
        kind = type(value)
        if secret:
            event[key] = "***"
        elif kind is str:
            if "earer" in value:
                event[key] = _BEARER.sub(r"\1***", value)
        elif kind not in _FLAT:  # a str subclass, a mapping, a list...: the general step
            event[key] = _masked(key, value)
    return event


_FLAT = frozenset({int, float, bool, type(None)})  # nothing to mask in these
_SECRET_NAMES: dict[object, bool] = {}  # a line's field names: whether each is a secret's


def _secret_name(key: object) -> bool:
    secret = isinstance(key, str) and key.lower() in _SECRET_KEYS
    if len(_SECRET_NAMES) < 4096:  # field names come from the code; bounded all the same
        _SECRET_NAMES[key] = secret
    return secret


_NESTED = (dict, list, tuple)
_MASKABLE = (str, *_NESTED)


def _masked(key: object, value: Any) -> Any:
    if isinstance(key, str) and key.lower() in _SECRET_KEYS:
        return "***"
    if isinstance(value, str):
        return _BEARER.sub(r"\1***", value) if "earer" in value else value
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}  # a copy: never the caller's
    if isinstance(value, list | tuple):
        return [_masked(None, v) if isinstance(v, _MASKABLE) else v for v in value]
    return value


PROCESSORS: tuple[Any, ...] = (
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,  # exc_info → the traceback as text, then redacted
    redact,
)


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """JSON lines by default; human-readable when stderr is a terminal (or json=False)."""
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    lines = Lines(sys.stderr.buffer) if as_json else None
    _LINES[:] = [lines] if lines is not None else []
    structlog.configure(
        processors=[*PROCESSORS, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(
            structlog.PrintLoggerFactory(sys.stderr) if lines is None else (lambda *_: lines)
        ),
        cache_logger_on_first_use=True,
    )


class Lines:
    """The logger under structlog's chain for JSON lines (structlog's `BytesLogger`, with
    its flush held on demand): each line is written to `stream` and flushed, except while
    `held` (a batch of access-log lines, see `lines_held`), whose end flushes them at once."""

    __slots__ = ("_flush", "_write", "held")

    def __init__(self, stream: BinaryIO) -> None:
        self._write, self._flush = stream.write, stream.flush
        self.held = False

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")
        if not self.held:
            self._flush()

    def flush(self) -> None:
        self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_LINES: list[Lines] = []  # the configured one, with JSON lines


@contextlib.contextmanager
def lines_held() -> Iterator[None]:
    """Lines logged inside go out in one write at its end (a batch's access-log lines)."""
    lines = _LINES[0] if _LINES else None
    if lines is None or lines.held:
        yield
        return
    lines.held = True
    try:
        yield
    finally:
        lines.held = False
        lines.flush()


def get_logger() -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger("sluicegate")
    return logger


_access = get_logger()  # bound once (`cache_logger_on_first_use`), not once per request


def access_log(record: RequestRecord) -> None:
    """One JSON line per request."""
    _access.info("request", **record.fields())
