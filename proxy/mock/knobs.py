"""The mock upstream's knobs (pure): what each one is, and how one request's are read.

A request's knobs are the server-wide defaults, then the body's `"mock": {...}`, then the
`x-mock` header (the same JSON object; the header wins). A mock made with `faults=True` also
reads the body's `"fault": {...}` after `"mock"`: the proxy sends one body to every candidate
of a route, so knobs there fail only the upstream that obeys them, and a fallback started
without `faults` answers as a healthy upstream would (the soak's faulty and backup upstreams).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.mock.content import ECHO_FORMS, ENCODINGS, NEWLINES, PREAMBLES, Invalid
from proxy.mock.replay import NAME

SPLIT_GAP = 0.001  # long enough that each piece leaves as its own TCP segment
Fields = tuple[str, ...]  # the body fields a mock reads knobs from, in order
MOCK: Fields = ("mock",)
MOCK_AND_FAULT: Fields = ("mock", "fault")


@dataclass(frozen=True, slots=True)
class Knobs:
    ttft: float = 0.05
    tokens: int = 16
    delay: float = 0.005
    keepalives: int = 0
    pause_after_first: float = 0.0
    reject_stream_options: bool = False
    usage_headers: bool = False
    split_utf8: bool = False
    split_pause: float = SPLIT_GAP  # seconds between a split event's pieces
    reset_after: int | None = None
    reset_mid_event: bool = False  # with reset_after: the drop falls inside the next event
    json_for_stream: bool = False
    status: int | None = None
    retry_after: float | None = None
    stall: float = 0.0
    echo_auth: bool = False  # an injected error quotes the Authorization (or api-key) it got
    echo_form: str = "plain"  # ...spelt so (content.ECHO_FORMS): plain, unicode, slash, truncated
    encoding: str = "identity"  # bodies sent whole (answers, errors): identity, gzip, deflate, br
    hostile_headers: bool = False  # every answer carries content.HOSTILE_HEADERS
    preamble: int = 0  # bytes a stream sends before its first event (content.preamble_writes)
    preamble_as: str = "comments"  # ...as keep-alive comments, or as one endless event
    set_cookie: bool = False  # every answer carries set-cookie and a hop-by-hop header
    newline: str = "lf"  # the SSE line ending: lf, crlf or cr (a key of NEWLINES)
    replay: str | None = None  # a recording's name: its bytes are the answer (proxy.mock.replay)
    replay_pause_at: int | None = None  # ...with `pause_after_first` s of silence after N events
    reasoning: int = 0  # reasoning tokens before the answer (responses: summary; chat: DeepSeek's)
    cached_tokens: int = 0  # input tokens reported as read from the cache (responses and chat)


DEFAULTS = Knobs()


def _knob_kinds() -> dict[str, tuple[type, bool]]:
    kinds = {}
    for name, hint in typing.get_type_hints(Knobs).items():
        args = typing.get_args(hint)
        base = next(a for a in args if a is not types.NoneType) if args else hint
        kinds[name] = (base, types.NoneType in args)
    return kinds


_KNOB_KINDS = _knob_kinds()
_KIND_WORDS = {bool: "a boolean", int: "a non-negative integer", float: "a non-negative number"}
# The string knobs and the words each accepts.
_CHOICES = {
    "newline": tuple(NEWLINES),
    "echo_form": ECHO_FORMS,
    "encoding": ENCODINGS,
    "preamble_as": PREAMBLES,
}


def _knob(name: str, value: Any, field: str) -> Any:
    if name not in _KNOB_KINDS:
        raise Invalid(f"Unknown mock knob: {name!r}", f"{field}.{name}")
    base, optional = _KNOB_KINDS[name]
    if value is None and optional:
        return None
    if base is str and name in _CHOICES:
        ok = value in _CHOICES[name]
    elif base is str:
        ok = isinstance(value, str) and NAME.fullmatch(value) is not None
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ok = ok and (name != "status" or 400 <= value <= 599)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value >= 0
    if not ok:
        raise Invalid(
            f"Invalid mock knob {name!r}: expected {_wanted(name, base)}", f"{field}.{name}"
        )
    return float(value) if base is float else value


def _wanted(name: str, base: type) -> str:
    if name == "status":
        return "an HTTP error status (400-599)"
    if base is str and name in _CHOICES:
        return "one of " + ", ".join(_CHOICES[name])
    if base is str:
        return "a recording's name (lower-case letters, digits, - and _)"
    return _KIND_WORDS[base]


def _overrides(source: Any, where: str, field: str) -> dict[str, Any]:
    if not isinstance(source, dict):
        raise Invalid(f"{where} must be a JSON object of mock knobs", where)
    return {name: _knob(name, value, field) for name, value in source.items()}


def knobs_for(
    defaults: Knobs, body: dict[str, Any], headers: dict[str, str], fields: Fields = MOCK
) -> Knobs:
    """The knobs one request runs with: the defaults, then each body field of `fields` in
    turn, then the `x-mock` header (the last wins); raises `Invalid` naming a bad knob."""
    overrides: dict[str, Any] = {}
    for field in fields:
        if field in body:
            overrides.update(_overrides(body[field], field, field))
    if "x-mock" in headers:
        try:
            from_header = orjson.loads(headers["x-mock"])
        except orjson.JSONDecodeError:
            from_header = None
        overrides.update(_overrides(from_header, "x-mock", "mock"))
    return dataclasses.replace(defaults, **overrides) if overrides else defaults
