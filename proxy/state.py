"""The application state: built once at start-up, replaced whole (never mutated)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from proxy.config import Config
from proxy.errors import ProxyError
from proxy.upstream import UpstreamClients


class NotReady(ProxyError):
    status = 503
    type = "server_error"
    code = "not_ready"


@dataclass(frozen=True, slots=True)
class AppState:
    config: Config
    clients: UpstreamClients
    rng: random.Random = field(default_factory=random.Random)


class StateRef:
    """The one mutable cell: handlers read `current` once per request and keep that."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: AppState | None = None

    def get(self) -> AppState:
        state = self.current
        if state is None:
            raise NotReady("sluicegate is starting or stopping")
        return state
