"""What one request did, written by the pipeline and read by observers (logs, later metrics)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    status: int = 0
    route: str | None = None  # the route's configured model name, never raw client input
    upstream: str | None = None
    model: str | None = None  # the upstream model that was asked
    stream: bool | None = None
    error: str | None = None  # our error code, when the request failed
    message: str | None = None
    client_disconnected: bool = False
    duration_ms: float = 0.0

    def fail(self, status: int, code: str | None, message: str) -> None:
        self.status, self.error, self.message = status, code, message

    def fields(self) -> dict[str, object]:
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {name: value for name, value in values if value is not None}


Observer = Callable[[RequestRecord], None]
