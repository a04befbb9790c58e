"""Route planning is pure: tables and a seeded random source, no sockets."""

from __future__ import annotations

import random
from collections import Counter

from proxy.config import Route, Target
from proxy.routing import plan

A = Target("a", "m-a", weight=3)
B = Target("b", "m-b", weight=1)
F = Target("f", "m-f")


def _idle(_upstream: str) -> int:
    return 0


def test_single_target_then_fallbacks_in_order() -> None:
    route = Route("r", targets=(A,), fallbacks=(F, B))
    assert plan(route, random.Random(0), _idle) == (A, F, B)


def test_weights_decide_the_share_of_first_place() -> None:
    route = Route("r", targets=(A, B), fallbacks=(F,))
    rng = random.Random(1234)
    firsts = Counter(plan(route, rng, _idle)[0].upstream for _ in range(20_000))
    assert abs(firsts["a"] / 20_000 - 0.75) < 0.02
    assert all(p[-1] == F for p in (plan(route, rng, _idle) for _ in range(100)))


def test_every_target_appears_once() -> None:
    route = Route("r", targets=(A, B, Target("c", "m-c", 2)))
    for seed in range(50):
        got = plan(route, random.Random(seed), _idle)
        assert sorted(t.upstream for t in got) == ["a", "b", "c"]
