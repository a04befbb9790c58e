"""The application state: built once at start-up, replaced whole on reload (never mutated).

`AppState` pairs one config with the upstream clients built for it. What must outlive a
reload (upstream health and latency, the state store, the in-flight count, the random
source) lives in `Runtime`, made once per process and handed to every AppState.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from proxy.config import Config
from proxy.errors import NotReady
from proxy.fleet.local import LocalStore
from proxy.fleet.owners import LocalOwners
from proxy.fleet.store import Store
from proxy.health import Health
from proxy.latency import Latency
from proxy.record import Observers
from proxy.upstream import UpstreamClients


@dataclass(slots=True)
class Runtime:
    health: Health = field(default_factory=Health)
    latency: Latency = field(default_factory=Latency)  # first-token times, per target
    rng: random.Random = field(default_factory=random.Random)
    inflight: int = 0  # requests being served by this process
    draining: bool = False  # SIGTERM seen: readiness goes false, in-flight work finishes
    observers: Observers = field(default_factory=Observers)  # set up in the lifespan
    store: Store = field(
        default_factory=LocalStore
    )  # keys' limits and spend; set up in the lifespan
    owners: LocalOwners = field(default_factory=LocalOwners)  # Responses API ids → upstream


@dataclass(frozen=True, slots=True)
class AppState:
    config: Config
    clients: UpstreamClients
    runtime: Runtime

    @property
    def health(self) -> Health:
        return self.runtime.health

    @property
    def latency(self) -> Latency:
        return self.runtime.latency

    @property
    def rng(self) -> random.Random:
        return self.runtime.rng


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
