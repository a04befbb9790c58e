"""Connections refused before any request reached the app (`proxy.connection`): over
`server.max_connections`, a request head over `server.max_header_bytes`, or one not complete
within `server.header_timeout`. The client got its answer (503, 431, 408) from the connection
itself, so no request record, access-log line or request count exists for it; this observer
counts each one (`sluicegate_connections_refused_total{reason}`) and logs them, at most one
line per reason every `LOG_EVERY` seconds with how many were refused since: a flood of
refusals must not become a flood of log lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.connection import REFUSED
from proxy.observe.logs import get_logger

REASONS = ("max_connections", "max_header_bytes", "header_timeout")  # the settings' names
LOG_EVERY = 10.0  # seconds
HINTS = {
    "max_connections": "the process serves its connection limit: add workers or replicas, "
    "or raise server.max_connections (and the open-file limit)",
    "max_header_bytes": "a request line and headers exceeded server.max_header_bytes",
    "header_timeout": "a request line and headers did not arrive within server.header_timeout",
}


class Refusals:
    """Called by the connection with a reason from `REASONS`; `count` is the metric's."""

    __slots__ = ("_clock", "_count", "_due", "_since")

    def __init__(
        self, count: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._count, self._clock = count, clock
        self._since: dict[str, int] = {}  # refused since the reason's last log line
        self._due: dict[str, float] = {}  # when the reason may log again

    def __call__(self, reason: str) -> None:
        self._count(reason)
        refused = self._since.get(reason, 0) + 1
        now = self._clock()
        if now < self._due.get(reason, now):
            self._since[reason] = refused
            return
        self._since[reason], self._due[reason] = 0, now + LOG_EVERY
        hint = HINTS.get(reason, "")
        get_logger().warning("connection_refused", reason=reason, refused=refused, hint=hint)


def refusal_state(count: Callable[[str], None]) -> dict[str, Refusals]:
    """What the app's lifespan leaves in the lifespan state for its connections to find."""
    return {REFUSED: Refusals(count)}
