"""Route planning (pure): the requested model → the ordered attempts to make."""

from __future__ import annotations

import random

from proxy.config import Route, Target


def plan(route: Route, rng: random.Random) -> tuple[Target, ...]:
    """Targets in weighted-random order (without replacement), then fallbacks in order.

    Efraimidis-Spirakis keys (u ** (1/w), highest first) give each target its weight's
    share of first place and a sensible order for the rest.
    """
    targets = route.targets
    if len(targets) > 1:
        keyed = sorted(targets, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)
        targets = tuple(keyed)
    return targets + route.fallbacks
