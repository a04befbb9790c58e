"""The first-token statistics and the `fastest` chooser are pure: tables, a seeded random
source and a hand-wound clock, no sockets."""

from __future__ import annotations

import math
import random
from collections import Counter

import orjson
import pytest

from proxy.api_request import ApiRequest, parse_request
from proxy.config import Outliers, Route, Target
from proxy.latency import (
    ALPHA,
    DECAY,
    HEDGE_MIN_SAMPLES,
    Latency,
    TargetLatency,
    hedge_after,
    prompt_size,
    request_size,
)
from proxy.routing import plan

FAST, SLOW, THIRD = Target("fast", "m"), Target("slow", "m"), Target("third", "m")
NEVER = Outliers(factor=None)
STEP = 0.06  # seconds between requests sent one at a time


def _idle(_upstream: str) -> int:
    return 0


def _route(*targets: Target, outliers: Outliers = NEVER, strategy: str = "fastest") -> Route:
    return Route("r", targets=targets, strategy=strategy, outliers=outliers)  # type: ignore[arg-type]


def _feed(
    latency: Latency, route: Route, target: Target, ttft: float, n: int, *, t: float
) -> float:
    for _ in range(n):
        t += STEP
        latency.record(route, target, ttft, 1.0, t)
    return t


def _run(latency: Latency, route: Route, ttft: dict[str, float], n: int, t: float) -> Counter[str]:
    """`n` requests one at a time: each goes to the plan's first pick and records its TTFT."""
    rng, firsts = random.Random(7), Counter[str]()
    for _ in range(n):
        t += STEP
        first = plan(route, rng, _idle, latency, t)[0]
        firsts[first.upstream] += 1
        latency.record(route, first, ttft[first.upstream], 1.0, t)
    return firsts


# --- the averages ----------------------------------------------------------------------


def test_first_sample_sets_the_averages_then_peaks_replace_and_dips_pull() -> None:
    stats = TargetLatency()
    stats.add(0.2, now=0.0)
    assert (stats.cost, stats.mean, stats.dev, stats.samples) == (0.2, 0.2, 0.1, 1)
    stats.add(0.8, now=0.0)  # above the cost: the peak replaces it at once
    assert stats.cost == 0.8
    assert stats.mean == pytest.approx(0.2 + ALPHA * 0.6)
    assert stats.dev == pytest.approx(0.1 + ALPHA * (0.6 - 0.1))
    stats.add(0.1, now=0.0)  # below: pulled by ALPHA only
    assert stats.cost == pytest.approx(0.8 + ALPHA * (0.1 - 0.8))


def test_an_unsampled_cost_decays_toward_zero_with_time() -> None:
    stats = TargetLatency()
    stats.add(0.4, now=10.0)
    assert stats.cost_at(10.0) == 0.4
    assert stats.cost_at(10.0 + DECAY) == pytest.approx(0.4 / math.e)
    assert stats.cost_at(5.0) == 0.4  # a reading from before the sample does not grow it


@pytest.mark.parametrize(
    ("prompt_bytes", "size"),
    [(0, 1.0), (400, 1.0), (4000, 1.0), (8000, 2.0), (32_000, 8.0)],
)
def test_prompt_size_is_in_units_of_1k_tokens_and_at_least_one(
    prompt_bytes: int, size: float
) -> None:
    assert prompt_size(prompt_bytes) == size


# --- the power of two choices ----------------------------------------------------------


def test_two_targets_the_lower_cost_goes_first_whatever_the_draw() -> None:
    latency, route = Latency(), _route(SLOW, FAST)
    _feed(latency, route, FAST, 0.05, 3, t=0.0)
    _feed(latency, route, SLOW, 0.4, 3, t=0.0)
    for seed in range(50):
        assert plan(route, random.Random(seed), _idle, latency, 1.0) == (FAST, SLOW)


def test_requests_in_flight_multiply_the_cost() -> None:
    latency, route = Latency(), _route(SLOW, FAST)
    _feed(latency, route, FAST, 0.05, 3, t=0.0)
    _feed(latency, route, SLOW, 0.1, 3, t=0.0)
    busy = {"fast": 2, "slow": 0}  # 0.05 x 3 > 0.1 x 1
    assert plan(route, random.Random(0), busy.__getitem__, latency, 1.0)[0] == SLOW


def test_a_target_without_samples_is_tried_first() -> None:
    latency, route = Latency(), _route(FAST, SLOW)
    _feed(latency, route, FAST, 0.05, 3, t=0.0)
    assert plan(route, random.Random(0), _idle, latency, 1.0)[0] == SLOW


def test_with_three_targets_the_slowest_never_leads_and_the_middle_wins_its_pairs() -> None:
    latency, route = Latency(), _route(FAST, SLOW, THIRD)
    for target, ttft in ((FAST, 0.05), (THIRD, 0.1), (SLOW, 0.4)):
        _feed(latency, route, target, ttft, 3, t=0.0)
    rng = random.Random(42)
    firsts = Counter(plan(route, rng, _idle, latency, 1.0)[0].upstream for _ in range(3000))
    assert firsts["slow"] == 0
    assert abs(firsts["third"] / 3000 - 1 / 3) < 0.04  # drawn with slow: one pair in three


def test_equal_targets_under_concurrency_share_the_load() -> None:
    """Cost x (in flight + 1): the fast target is not herded to death."""
    latency, route = Latency(), _route(FAST, SLOW)
    _feed(latency, route, FAST, 0.05, 3, t=0.0)
    _feed(latency, route, SLOW, 0.05, 3, t=0.0)
    inflight = {"fast": 0, "slow": 0}
    for _ in range(50):
        first = plan(route, random.Random(1), inflight.__getitem__, latency, 1.0)[0]
        inflight[first.upstream] += 1
    assert inflight == {"fast": 25, "slow": 25}


# --- exploration -----------------------------------------------------------------------


def test_a_slow_target_gets_a_bounded_share_and_never_starves() -> None:
    """Its cost decays unread, so it is probed about every DECAY * ln(0.4 / 0.05) s."""
    latency, route = Latency(), _route(FAST, SLOW)
    ttft = {"fast": 0.05, "slow": 0.4}
    _run(latency, route, ttft, 4, 0.0)  # both sampled
    n = 1000  # 60 s of requests one at a time
    firsts = _run(latency, route, ttft, n, 1.0)
    interval = DECAY * math.log(0.4 / 0.05)
    probes = n * STEP / interval
    assert firsts["slow"] >= 1
    assert firsts["slow"] <= probes + 2
    assert firsts["fast"] >= 0.99 * n


def test_a_recovered_target_wins_its_traffic_back_after_one_probe() -> None:
    latency, route = Latency(), _route(FAST, SLOW)
    _run(latency, route, {"fast": 0.8, "slow": 0.4}, 50, 0.0)  # fast is slow for a while
    later = _run(latency, route, {"fast": 0.05, "slow": 0.4}, 200, 10.0)  # then recovers
    slack = DECAY * math.log(0.8 / 0.4) / STEP + 5  # its cost decays below slow's, then it wins
    assert later["slow"] <= slack
    assert later["fast"] >= 200 - slack


# --- outlier ejection ------------------------------------------------------------------

EJECT = Outliers(factor=5.0, min_samples=20, seconds=30.0)


@pytest.mark.parametrize(
    ("slow_ttft", "samples", "ejected"),
    [
        (0.5, 19, False),  # 10x, one sample short
        (0.5, 20, True),  # 10x, enough samples
        (0.2, 60, False),  # 4x: under the factor however long
        (0.26, 20, True),  # just over 5x
    ],
)
def test_ejection_needs_the_factor_over_the_best_peer_and_the_samples(
    slow_ttft: float, samples: int, ejected: bool
) -> None:
    latency, route = Latency(), _route(FAST, SLOW, THIRD, outliers=EJECT, strategy="weighted")
    _feed(latency, route, FAST, 0.05, 5, t=0.0)
    _feed(latency, route, THIRD, 0.1, 5, t=0.0)
    t = _feed(latency, route, SLOW, slow_ttft, samples, t=0.0)
    assert latency.ejected(("slow", "m"), t) is ejected
    assert not latency.ejected(("fast", "m"), t)


def test_an_ejected_target_goes_last_in_any_strategy_then_is_probed_back() -> None:
    latency, route = Latency(), _route(SLOW, FAST, outliers=EJECT, strategy="weighted")
    seen: list[tuple[str, bool]] = []
    latency.on_eject = lambda upstream, _model, active: seen.append((upstream, active))
    _feed(latency, route, FAST, 0.05, 5, t=0.0)
    t = _feed(latency, route, SLOW, 0.5, 20, t=0.0)
    assert seen == [("slow", True)]
    for seed in range(20):
        assert plan(route, random.Random(seed), _idle, latency, t + 1)[-1] == SLOW
    after = t + EJECT.seconds
    assert not latency.ejected(("slow", "m"), after)  # its time is up: back, stats forgotten
    assert seen == [("slow", True), ("slow", False)]
    latency.record(route, SLOW, 0.5, 1.0, after)  # the probe: still slow, out again at once
    assert latency.ejected(("slow", "m"), after)
    assert latency.ejected(("slow", "m"), after + EJECT.seconds - 1)


def test_a_probe_that_comes_back_fast_keeps_the_target_in() -> None:
    latency, route = Latency(), _route(SLOW, FAST, outliers=EJECT, strategy="weighted")
    _feed(latency, route, FAST, 0.05, 5, t=0.0)
    t = _feed(latency, route, SLOW, 0.5, 20, t=0.0) + EJECT.seconds
    assert not latency.ejected(("slow", "m"), t)
    latency.record(route, SLOW, 0.06, 1.0, t)
    _feed(latency, route, SLOW, 0.5, 5, t=t)  # slow again, but judged on samples again
    assert not latency.ejected(("slow", "m"), t + 1)


def test_an_ejection_ends_early_when_the_peers_slow_past_the_ejected_one() -> None:
    latency, route = Latency(), _route(SLOW, FAST, outliers=EJECT, strategy="weighted")
    _feed(latency, route, FAST, 0.05, 5, t=0.0)
    t = _feed(latency, route, SLOW, 0.3, 20, t=0.0)
    assert latency.ejected(("slow", "m"), t)
    t = _feed(latency, route, FAST, 0.5, 1, t=t)  # the peer's mean, 0.185: still the faster
    assert latency.ejected(("slow", "m"), t)
    t = _feed(latency, route, FAST, 1.0, 5, t=t)  # its mean passes 0.3: the one left is slower
    assert not latency.ejected(("slow", "m"), t)
    firsts = Counter(plan(route, random.Random(s), _idle, latency, t)[0] for s in range(40))
    assert firsts[SLOW] > 10  # weighted again, not last


def test_a_long_prompt_burst_does_not_eject_a_healthy_upstream() -> None:
    """First tokens of 8k-token prompts take 8x as long; divided by the size they do not."""
    latency, route = Latency(), _route(SLOW, FAST, outliers=EJECT, strategy="weighted")
    _feed(latency, route, FAST, 0.1, 10, t=0.0)
    size = prompt_size(32_000)
    for i in range(40):  # the burst lands on one upstream
        latency.record(route, SLOW, 0.1 * size, size, 1.0 + i * STEP)
    assert not latency.ejected(("slow", "m"), 5.0)
    assert latency[("slow", "m")].mean == pytest.approx(0.1)
    raw = Latency()  # the same burst, not normalised, would have been ejected
    _feed(raw, route, FAST, 0.1, 10, t=0.0)
    _feed(raw, route, SLOW, 0.1 * size, 40, t=0.0)
    assert raw.ejected(("slow", "m"), 5.0)


def test_the_best_target_is_never_ejected_and_factor_none_never_ejects() -> None:
    latency, route = Latency(), _route(FAST, SLOW, outliers=NEVER)
    _feed(latency, route, FAST, 0.05, 30, t=0.0)
    t = _feed(latency, route, SLOW, 5.0, 30, t=0.0)
    assert not latency.ejected(("slow", "m"), t)
    alone = _route(FAST, outliers=EJECT)
    _feed(latency, alone, FAST, 9.0, 30, t=0.0)
    assert not latency.ejected(("fast", "m"), t)
    fresh, backed = Latency(), Route("r", targets=(FAST,), fallbacks=(THIRD,), outliers=EJECT)
    _feed(fresh, backed, FAST, 0.05, 30, t=0.0)
    _feed(fresh, backed, THIRD, 9.0, 30, t=0.0)  # a fallback is not judged against targets
    assert not fresh.ejected(("third", "m"), t)


# --- hedge_after: auto -----------------------------------------------------------------


def _request(content: str) -> ApiRequest:
    body = {"model": "r", "stream": True, "messages": [{"role": "user", "content": content}]}
    return parse_request(orjson.dumps(body))


SHORT, LONG = _request("hi"), _request("x" * 11_960)  # 12,000 bytes of prompt JSON: 3k tokens


def test_auto_hedge_waits_for_samples_then_past_the_usual_first_token_time() -> None:
    latency, route = Latency(), Route("r", targets=(FAST, SLOW), hedge_after="auto")
    t = _feed(latency, route, FAST, 0.1, HEDGE_MIN_SAMPLES - 1, t=0.0)
    assert hedge_after(route, FAST, latency, SHORT) is None
    _feed(latency, route, FAST, 0.1, 1, t=t)
    stats = latency[("fast", "m")]
    usual = max(stats.mean + 4 * stats.dev, 1.5 * stats.mean)
    assert hedge_after(route, FAST, latency, SHORT) == pytest.approx(usual)
    assert request_size(LONG) == pytest.approx(3.0, rel=0.01)
    assert hedge_after(route, FAST, latency, LONG) == pytest.approx(request_size(LONG) * usual)
    _feed(latency, route, FAST, 0.1, 30, t=t)  # steady: the deviation fades, the floor holds
    assert hedge_after(route, FAST, latency, SHORT) == pytest.approx(0.15, rel=0.01)
    fixed = Route("r", targets=(FAST, SLOW), hedge_after=0.3)
    assert hedge_after(fixed, FAST, latency, LONG) == 0.3


# --- a fleet: statistics per process ---------------------------------------------------


def test_per_process_statistics_move_away_from_a_degraded_target_as_fast_as_shared() -> None:
    """With traffic spread over processes, each one's table sees the degradation at its first
    slow sample (the peak replaces the cost), as a shared table would: one request each."""
    route = _route(FAST, SLOW)
    shared, processes = Latency(), [Latency(), Latency()]
    for table in (shared, *processes):
        _run(table, route, {"fast": 0.05, "slow": 0.4}, 40, 0.0)
    degraded = {"fast": 0.8, "slow": 0.4}
    moved_shared = _run(shared, route, degraded, 20, 3.0)
    moved = [_run(table, route, degraded, 10, 3.0) for table in processes]
    assert moved_shared["fast"] == 1
    assert [m["fast"] for m in moved] == [1, 1]
