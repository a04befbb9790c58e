"""Per-process upstream health: cooldown, Retry-After, retry budget, in-flight counts.

Kept by upstream name and carried across config reloads. Time is passed in (a monotonic
clock reading), so the state machines are tested with tables, no event loop.

Cooldown is a small circuit breaker: `failures` consecutive failed attempts open it for
`seconds`; after that one probe request is let through (half-open) and its outcome either
closes the circuit or opens it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from proxy.config import Cooldown

CooldownObserver = Callable[[str, bool], None]


class SharedHealth(Protocol):
    """Told of every verdict, to share it with the fleet (proxy.fleet.health); must not block."""

    def succeeded(self, name: str) -> None: ...

    def failed(self, name: str, policy: Cooldown, probe: bool) -> None: ...


# A burst allowance, so a quiet upstream can still retry; beyond it retries must be earned
# by ordinary traffic at the configured ratio (Finagle's RetryBudget, without the clock).
_BUDGET_RESERVE = 3.0
_BUDGET_CAP = 10.0


class UpstreamHealth:
    __slots__ = (
        "_budget",
        "_failures",
        "_open_until",
        "_period",
        "_probe_started",
        "_probing",
        "inflight",
        "name",
        "not_before",
        "rejects_stream_options",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.inflight = 0
        self.rejects_stream_options = False  # learnt from a 400 naming the field
        self.not_before = 0.0  # honour the upstream's Retry-After
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False
        self._probe_started = 0.0
        self._period = 0.0  # the cooldown length in force, also the longest a probe may take
        self._budget = _BUDGET_RESERVE

    @property
    def probing(self) -> bool:
        return self._probing

    def in_cooldown(self, now: float) -> bool:
        if self._open_until is None:
            return False
        if self._probing:  # a probe that never got a verdict must not hold it out for ever
            return now < self._probe_started + self._period
        return now < self._open_until

    def available(self, now: float) -> bool:
        return now >= self.not_before and not self.in_cooldown(now)

    def begin(self, now: float) -> None:
        """An attempt starts; past the cooldown, it is the probe."""
        if self._open_until is not None and now >= self._open_until:
            self._probing, self._probe_started = True, now

    def succeeded(self) -> bool:
        """Returns True when this closed an open circuit."""
        was_open = self._open_until is not None
        self._failures, self._open_until, self._probing = 0, None, False
        return was_open

    def failed(self, now: float, policy: Cooldown) -> bool:
        """Returns True when this opened the circuit."""
        self._failures += 1
        was_probe, self._probing = self._probing, False
        if was_probe or (self._open_until is None and self._failures >= policy.failures):
            self._open_until, self._period = now + policy.seconds, policy.seconds
            return not was_probe
        return False

    def open_for(self, now: float, remaining: float, period: float) -> bool:
        """A cooldown learnt from the fleet, `remaining` seconds of a `period`-long one.
        Returns True when this opened the circuit; a probe in flight keeps its turn."""
        if self._probing or (self._open_until is not None and self._open_until >= now + remaining):
            return False
        was_closed = self._open_until is None
        self._open_until, self._period = now + remaining, period
        return was_closed

    def release_probe(self) -> None:
        """The probe ended without a health verdict (a 4xx, a cancel): the circuit stays
        open as it was, and the next request may probe."""
        self._probing = False

    def deposit(self, ratio: float) -> None:
        """A first attempt: earns `ratio` of a retry."""
        self._budget = min(_BUDGET_CAP, self._budget + ratio)

    def withdraw(self) -> bool:
        """A re-attempt: allowed while the budget holds a whole retry."""
        if self._budget >= 1.0:
            self._budget -= 1.0
            return True
        return False


class Health:
    """All upstreams' health in this process; observers hear of cooldown changes."""

    def __init__(self, on_cooldown: CooldownObserver | None = None) -> None:
        self._by_name: dict[str, UpstreamHealth] = {}
        self.on_cooldown = on_cooldown
        self.shared: SharedHealth | None = None  # set in the lifespan with `state.url`

    def __getitem__(self, name: str) -> UpstreamHealth:
        health = self._by_name.get(name)
        if health is None:
            health = self._by_name[name] = UpstreamHealth(name)
        return health

    def keep_only(self, names: Iterable[str]) -> None:
        """After a reload: forget upstreams that are gone, keep the rest as they are."""
        wanted = set(names)
        for name in [n for n in self._by_name if n not in wanted]:
            del self._by_name[name]

    def succeeded(self, name: str) -> None:
        if self[name].succeeded():
            self._notify(name, False)
        if self.shared is not None:
            self.shared.succeeded(name)

    def failed(self, name: str, now: float, policy: Cooldown) -> None:
        health = self[name]
        probe = health.probing
        if health.failed(now, policy):
            self._notify(name, True)
        if self.shared is not None:
            self.shared.failed(name, policy, probe)

    def open_shared(self, name: str, now: float, remaining: float, period: float) -> None:
        if self[name].open_for(now, remaining, period):
            self._notify(name, True)

    def _notify(self, name: str, active: bool) -> None:
        if self.on_cooldown is not None:
            self.on_cooldown(name, active)
