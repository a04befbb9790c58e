"""Upstream health is a pure state machine over explicit clock readings: tables, no loop."""

from __future__ import annotations

import pytest

from proxy.config import Cooldown
from proxy.health import Health, UpstreamHealth

POLICY = Cooldown(failures=3, seconds=30.0)

# One script step: (action, now, what the call returned, available(now) afterwards).
# Actions: "fail" → failed(now) (True: it opened the circuit), "ok" → succeeded() (True: it
# closed one), "begin" → begin(now), "check" → no call. Three failures at t=0,1,2 open the
# circuit until t=32.
Step = tuple[str, float, bool | None, bool]
OPENED: list[Step] = [("fail", 0, False, True), ("fail", 1, False, True), ("fail", 2, True, False)]

SCRIPTS: dict[str, list[Step]] = {
    "fewer-failures-than-the-threshold-stay-closed": [
        ("fail", 0, False, True),
        ("fail", 1, False, True),
    ],
    "the-threshold-failure-opens-for-the-cooldown": [
        *OPENED,
        ("check", 31.999, None, False),
        ("check", 32, None, True),
    ],
    "a-success-resets-the-consecutive-count": [
        ("fail", 0, False, True),
        ("fail", 1, False, True),
        ("ok", 2, False, True),
        ("fail", 3, False, True),
        ("fail", 4, False, True),
        ("fail", 5, True, False),
    ],
    "failures-while-open-neither-report-nor-extend-it": [
        *OPENED,
        ("fail", 20, False, False),
        ("check", 32, None, True),
    ],
    "an-attempt-during-the-cooldown-is-not-the-probe": [
        *OPENED,
        ("begin", 10, None, False),
        ("check", 32, None, True),
    ],
    "past-the-cooldown-one-probe-goes-and-the-rest-wait": [
        *OPENED,
        ("begin", 32, None, False),
        ("check", 40, None, False),
    ],
    "probe-success-closes-the-circuit": [
        *OPENED,
        ("begin", 32, None, False),
        ("ok", 33, True, True),
        ("check", 34, None, True),
    ],
    "after-closing-the-count-starts-from-zero": [
        *OPENED,
        ("begin", 32, None, False),
        ("ok", 33, True, True),
        ("fail", 34, False, True),
        ("fail", 35, False, True),
        ("fail", 36, True, False),
    ],
    "probe-failure-reopens-for-a-new-cooldown": [
        *OPENED,
        ("begin", 32, None, False),
        ("fail", 40, False, False),
        ("check", 69.999, None, False),
        ("check", 70, None, True),
    ],
    "after-a-reopen-the-next-probe-can-close-it": [
        *OPENED,
        ("begin", 32, None, False),
        ("fail", 40, False, False),
        ("begin", 70, None, False),
        ("ok", 71, True, True),
    ],
    "a-success-while-open-closes-it": [
        *OPENED,
        ("ok", 10, True, True),
    ],
}


def _run(health: UpstreamHealth, step: Step) -> tuple[bool | None, bool]:
    action, now, _, _ = step
    returned: bool | None = None
    if action == "fail":
        returned = health.failed(now, POLICY)
    elif action == "ok":
        returned = health.succeeded()
    elif action == "begin":
        health.begin(now)
    return returned, health.available(now)


@pytest.mark.parametrize("script", list(SCRIPTS.values()), ids=list(SCRIPTS))
def test_cooldown_state_machine(script: list[Step]) -> None:
    health = UpstreamHealth("a")
    got = [_run(health, step) for step in script]
    assert got == [(returned, available) for _, _, returned, available in script]


def test_a_fresh_upstream_is_available_and_idle() -> None:
    health = UpstreamHealth("a")
    assert (health.name, health.inflight, health.not_before) == ("a", 0, 0.0)
    assert health.rejects_stream_options is False
    assert health.available(0.0)
    assert not health.in_cooldown(0.0)


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    health = UpstreamHealth("a")
    assert health.failed(5.0, Cooldown(failures=1, seconds=2.0)) is True
    assert [health.available(t) for t in (5.0, 6.999, 7.0)] == [False, False, True]


def test_retry_after_holds_the_upstream_until_not_before() -> None:
    health = UpstreamHealth("a")
    health.not_before = 10.0
    assert [health.available(t) for t in (0.0, 9.999, 10.0)] == [False, False, True]
    assert not health.in_cooldown(5.0)  # Retry-After is not a circuit: no probe needed


def test_retry_after_and_cooldown_both_have_to_pass() -> None:
    health = UpstreamHealth("a")
    for t in (0.0, 1.0, 2.0):
        health.failed(t, POLICY)
    health.not_before = 40.0
    assert [health.available(t) for t in (32.0, 39.999, 40.0)] == [False, False, True]


def test_a_probe_without_a_verdict_does_not_hold_the_upstream_out_for_ever() -> None:
    health = UpstreamHealth("a")
    for t in (0.0, 1.0, 2.0):
        health.failed(t, POLICY)
    health.begin(32.0)  # the probe; it is answered 429, which is neither success nor failure
    assert health.available(32.0 + 3600.0)


def _withdrawals(health: UpstreamHealth) -> int:
    """How many re-attempts the budget pays for now (it empties the budget)."""
    count = 0
    while count < 100 and health.withdraw():
        count += 1
    return count


@pytest.mark.parametrize(
    ("deposits", "expected"),
    [
        ([], 3),
        ([0.2], 3),
        ([0.5, 0.5], 4),
        ([0.25] * 8, 5),
        ([1.0] * 7, 10),
        ([1.0] * 20, 10),
        ([100.0], 10),
    ],
    ids=[
        "reserve-of-three",
        "a-fraction-does-not-make-a-retry",
        "two-halves-make-one",
        "quarters-add-up",
        "exactly-at-the-cap",
        "capped-at-ten",
        "one-huge-deposit-is-capped",
    ],
)
def test_retry_budget(deposits: list[float], expected: int) -> None:
    health = UpstreamHealth("a")
    for ratio in deposits:
        health.deposit(ratio)
    assert _withdrawals(health) == expected


def test_withdraw_needs_a_whole_retry_and_keeps_the_remainder() -> None:
    health = UpstreamHealth("a")
    assert _withdrawals(health) == 3
    health.deposit(0.5)
    assert health.withdraw() is False  # a refused withdrawal takes nothing
    health.deposit(0.5)
    assert health.withdraw() is True
    assert health.withdraw() is False


def test_health_keeps_one_state_per_upstream_name() -> None:
    health = Health()
    assert health["a"] is health["a"]
    assert health["a"] is not health["b"]
    assert health["b"].name == "b"


def test_keep_only_forgets_removed_upstreams_and_keeps_the_rest_as_they_are() -> None:
    health = Health()
    kept, dropped = health["a"], health["b"]
    kept.inflight, dropped.inflight = 2, 5
    for t in (0.0, 1.0, 2.0):
        health.failed("a", t, POLICY)
    health.keep_only(["a", "c"])
    assert health["a"] is kept
    assert (kept.inflight, kept.available(10.0)) == (2, False)
    assert health["b"] is not dropped
    assert (health["b"].inflight, health["b"].available(0.0)) == (0, True)


# Health-level scripts: (action, upstream, now); the observer's calls are compared at the end.
HealthStep = tuple[str, str, float]
OPEN_A: list[HealthStep] = [("fail", "a", 0), ("fail", "a", 1), ("fail", "a", 2)]

TRANSITIONS: dict[str, tuple[list[HealthStep], list[tuple[str, bool]]]] = {
    "success-while-closed-is-silent": ([("fail", "a", 0), ("ok", "a", 1)], []),
    "opening-is-heard-once": (OPEN_A, [("a", True)]),
    "failures-while-open-are-silent": ([*OPEN_A, ("fail", "a", 10)], [("a", True)]),
    "probe-success-is-heard-as-closed": (
        [*OPEN_A, ("begin", "a", 32), ("ok", "a", 33)],
        [("a", True), ("a", False)],
    ),
    "probe-failure-is-silent-the-circuit-never-closed": (
        [*OPEN_A, ("begin", "a", 32), ("fail", "a", 33)],
        [("a", True)],
    ),
    "reopen-then-close-is-heard-once-each-way": (
        [*OPEN_A, ("begin", "a", 32), ("fail", "a", 33), ("begin", "a", 63), ("ok", "a", 64)],
        [("a", True), ("a", False)],
    ),
    "a-second-episode-is-heard-again": (
        [*OPEN_A, ("ok", "a", 40), ("fail", "a", 41), ("fail", "a", 42), ("fail", "a", 43)],
        [("a", True), ("a", False), ("a", True)],
    ),
    "upstreams-are-independent": (
        [("fail", "a", 0), ("fail", "b", 0), ("fail", "a", 1), ("fail", "a", 2), ("ok", "b", 3)],
        [("a", True)],
    ),
}


@pytest.mark.parametrize(("script", "heard"), list(TRANSITIONS.values()), ids=list(TRANSITIONS))
def test_observer_hears_each_cooldown_transition_exactly_once(
    script: list[HealthStep], heard: list[tuple[str, bool]]
) -> None:
    calls: list[tuple[str, bool]] = []
    health = Health(on_cooldown=lambda name, active: calls.append((name, active)))
    for action, name, now in script:
        if action == "fail":
            health.failed(name, now, POLICY)
        elif action == "ok":
            health.succeeded(name)
        else:
            health[name].begin(now)
    assert calls == heard


def test_health_without_an_observer_still_tracks_cooldowns() -> None:
    health = Health()
    for t in (0.0, 1.0, 2.0):
        health.failed("a", t, POLICY)
    assert not health["a"].available(2.0)
    health.succeeded("a")
    assert health["a"].available(2.0)
