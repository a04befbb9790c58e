"""Routing rules are pure: plans from a seeded random source, the failure classifier as a
table over every attempt outcome, and backoff bounds."""

from __future__ import annotations

import random
from collections import Counter
from typing import get_args

import pytest

from proxy.api_request import StreamOptionsAction
from proxy.config import Route, Strategy, StreamOptionsMode, Target
from proxy.errors import (
    BadRequest,
    ProxyError,
    Untranslatable,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamUnreachable,
)
from proxy.record import Attempt, AttemptOutcome
from proxy.routing import (
    Verdict,
    backoff,
    classify,
    client_may_retry,
    outcome_for_status,
    plan,
    retried,
)
from proxy.routing import outcome_of as outcome_of_error
from proxy.routing import rejects_stream_options as rejects

A = Target("a", "m-a", weight=3)
B = Target("b", "m-b", weight=1)
C = Target("c", "m-c", weight=2)
F1 = Target("f1", "m-f1", weight=50)
F2 = Target("f2", "m-f2")
DRAWS = 20_000
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


def _idle(name: str) -> int:
    return 0


def _first_place_shares(route: Route, inflight: dict[str, int], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    firsts = Counter(plan(route, rng, inflight.__getitem__)[0].upstream for _ in range(DRAWS))
    return {name: count / DRAWS for name, count in sorted(firsts.items())}


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ((A, B), {"a": 0.75, "b": 0.25}),
        ((A, B, C), {"a": 0.5, "b": 1 / 6, "c": 1 / 3}),
        ((B, Target("d", "m-d", weight=1)), {"b": 0.5, "d": 0.5}),
    ],
    ids=["3-to-1", "3-1-2", "equal"],
)
@pytest.mark.parametrize("seed", [1, 2024])
def test_weights_decide_the_share_of_first_place(
    targets: tuple[Target, ...], expected: dict[str, float], seed: int
) -> None:
    route = Route("r", targets=targets, fallbacks=(F1,))
    shares = _first_place_shares(route, {t.upstream: 0 for t in targets}, seed)
    assert shares.keys() == expected.keys()
    for name, share in expected.items():
        assert shares[name] == pytest.approx(share, abs=0.015), name


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "targets", [(A,), (A, B), (A, B, C)], ids=["one-target", "two-targets", "three-targets"]
)
def test_every_target_once_then_fallbacks_last_in_configured_order(
    strategy: Strategy, targets: tuple[Target, ...]
) -> None:
    route = Route("r", targets=targets, fallbacks=(F1, F2), strategy=strategy)
    rng = random.Random(7)
    for _ in range(200):
        got = plan(route, rng, _idle)
        assert sorted(got[: len(targets)], key=targets.index) == list(targets)
        assert got[len(targets) :] == (F1, F2)  # a heavy fallback weight changes nothing


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_single_target_is_planned_without_drawing(strategy: Strategy) -> None:
    rng = random.Random(3)
    before = rng.getstate()
    assert plan(Route("r", targets=(A,), fallbacks=(F2,), strategy=strategy), rng, _idle) == (
        A,
        F2,
    )
    assert rng.getstate() == before


def test_weighted_strategy_never_asks_for_inflight_counts() -> None:
    asked: list[str] = []

    def inflight(name: str) -> int:
        asked.append(name)
        return 0

    plan(Route("r", targets=(A, B, C)), random.Random(0), inflight)
    assert asked == []


@pytest.mark.parametrize("seed", range(20))
def test_least_inflight_puts_the_fewest_in_flight_first_whatever_the_weights(seed: int) -> None:
    route = Route("r", targets=(A, B, C), fallbacks=(F1,), strategy="least_inflight")
    inflight = {"a": 5, "b": 0, "c": 2}
    assert plan(route, random.Random(seed), inflight.__getitem__) == (B, C, A, F1)


def test_least_inflight_breaks_ties_by_the_weighted_draw() -> None:
    route = Route("r", targets=(A, B, C), strategy="least_inflight")
    shares = _first_place_shares(route, {"a": 4, "b": 4, "c": 4}, seed=11)
    assert shares == pytest.approx({"a": 0.5, "b": 1 / 6, "c": 1 / 3}, abs=0.015)


def test_least_inflight_ties_behind_the_least_loaded_follow_their_weights() -> None:
    route = Route("r", targets=(A, B, C), strategy="least_inflight")
    rng, inflight = random.Random(5), {"a": 1, "b": 1, "c": 0}
    seconds = Counter(plan(route, rng, inflight.__getitem__)[1:] for _ in range(DRAWS))
    assert seconds.keys() == {(A, B), (B, A)}
    assert seconds[(A, B)] / DRAWS == pytest.approx(0.75, abs=0.015)


# --- classify ---------------------------------------------------------------------------

RETRY_UNHEALTHY = Verdict(next_candidate=True, unhealthy=True)
RETRY_HEALTHY = Verdict(next_candidate=True, unhealthy=False)
FINAL = Verdict(next_candidate=False, unhealthy=False)
FINAL_UNHEALTHY = Verdict(next_candidate=False, unhealthy=True)

VERDICTS: dict[str, Verdict] = {
    "ok": FINAL,  # committed: nothing to classify
    "connect_error": RETRY_UNHEALTHY,
    # A certificate that fails verification: another upstream may answer; it counts toward
    # cooldown, so later requests skip it until a probe finds it fixed.
    "tls_error": RETRY_UNHEALTHY,
    # Sent, then given up on: the upstream may still be generating (and billing) it.
    "timeout": FINAL_UNHEALTHY,
    "first_token_timeout": RETRY_UNHEALTHY,
    "reset": RETRY_UNHEALTHY,
    "status_5xx": RETRY_UNHEALTHY,
    "stream_error": RETRY_UNHEALTHY,
    "status_429": RETRY_HEALTHY,  # our rate limit, not the upstream's health
    "status_auth": RETRY_HEALTHY,  # this upstream's key or model; a fallback may answer
    "status_4xx": FINAL,  # the request itself is wrong: every upstream would say so
    # A Responses request a chat upstream cannot take: a native one of the route may.
    "untranslatable": RETRY_HEALTHY,
    "too_large": RETRY_HEALTHY,  # past a size limit: another upstream may answer smaller
    # Handled before classify (re-sent without the field / never attempted / not failures).
    "stream_options_rejected": FINAL,
    "hedge_lost": FINAL,
    "cancelled": FINAL,
    "skipped_cooldown": FINAL,
}


def test_the_verdict_table_covers_every_attempt_outcome() -> None:
    assert sorted(VERDICTS) == sorted(get_args(AttemptOutcome))


@pytest.mark.parametrize(("outcome", "verdict"), list(VERDICTS.items()), ids=list(VERDICTS))
def test_classify(outcome: AttemptOutcome, verdict: Verdict) -> None:
    assert classify(outcome) == verdict


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, "status_4xx"),
        (401, "status_auth"),
        (402, "status_4xx"),
        (403, "status_auth"),
        (404, "status_auth"),
        (408, "status_4xx"),
        (413, "status_4xx"),
        (422, "status_4xx"),
        (429, "status_429"),
        (499, "status_4xx"),
        (500, "status_5xx"),
        (502, "status_5xx"),
        (503, "status_5xx"),
        (504, "status_5xx"),
        (529, "status_5xx"),  # Anthropic-style "overloaded"
    ],
    ids=str,
)
def test_outcome_for_status(status: int, outcome: AttemptOutcome) -> None:
    assert outcome_for_status(status) == outcome


@pytest.mark.parametrize("status", range(400, 500), ids=str)
def test_4xx_are_final_except_auth_and_rate_limits_and_never_unhealthy(status: int) -> None:
    verdict = classify(outcome_for_status(status))
    assert verdict.next_candidate == (status in (401, 403, 404, 429))
    assert verdict.unhealthy is False


@pytest.mark.parametrize("status", range(500, 600), ids=str)
def test_5xx_move_on_and_count_against_the_upstream(status: int) -> None:
    assert classify(outcome_for_status(status)) == RETRY_UNHEALTHY


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (UpstreamUnreachable("refused"), "connect_error"),
        (UpstreamTlsError("certificate verify failed"), "tls_error"),
        (UpstreamTimeout("silent"), "timeout"),
        (UpstreamProtocolError("closed"), "reset"),
        (ProxyError("anything else"), "reset"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ProxyError) else str(v),
)
def test_outcome_of_our_own_errors(error: ProxyError, outcome: AttemptOutcome) -> None:
    assert outcome_of_error(error) == outcome
    # another upstream may answer; a timeout only where the upstream allows its re-send
    assert classify(outcome, retry_on_timeout=True) == RETRY_UNHEALTHY


@pytest.mark.parametrize("outcome", sorted(VERDICTS), ids=str)
def test_retry_on_timeout_changes_only_the_timeout(outcome: AttemptOutcome) -> None:
    resent = classify(outcome, retry_on_timeout=True)
    assert resent == (RETRY_UNHEALTHY if outcome == "timeout" else VERDICTS[outcome])


def test_a_request_no_upstream_can_take_goes_back_to_the_client() -> None:
    assert outcome_of_error(BadRequest("malformed for every upstream")) == "status_4xx"
    assert classify("status_4xx") == FINAL


def test_a_request_a_chat_upstream_cannot_translate_moves_on() -> None:
    """A native upstream of the route may take `previous_response_id`, built-in tools..."""
    error = Untranslatable("'background' is not supported by this upstream", param="background")
    assert outcome_of_error(error) == "untranslatable"
    assert classify("untranslatable") == RETRY_HEALTHY
    assert not retried("untranslatable")  # the same upstream would refuse it again


@pytest.mark.parametrize("outcome", sorted(VERDICTS), ids=str)
def test_only_tls_and_translation_failures_rule_out_a_retry_on_the_same_upstream(
    outcome: AttemptOutcome,
) -> None:
    assert retried(outcome) == (outcome not in ("tls_error", "untranslatable"))


NAMES_IT = b'{"error": {"message": "Unrecognized request argument: stream_options"}}'
NOT_IT = b'{"error": {"message": "messages: field required"}}'


@pytest.mark.parametrize(
    ("status", "body", "mode", "action", "rejected"),
    [
        (400, NAMES_IT, "auto", "inject", True),  # the one case: learnt, sent again without
        (400, NOT_IT, "auto", "inject", False),  # some other mistake in the request
        (422, NAMES_IT, "auto", "inject", False),  # only a 400 says "unknown field"
        (500, NAMES_IT, "auto", "inject", False),
        (400, NAMES_IT, "auto", "strip", False),  # sent without it: not about the field
        (400, NAMES_IT, "pass", "pass", False),  # the client's own field: its answer to see
        (400, NAMES_IT, "strip", "strip", False),
    ],
    ids=["400-naming-it", "400-other", "422", "500", "stripped", "pass-mode", "strip-mode"],
)
def test_rejects_stream_options(
    status: int, body: bytes, mode: StreamOptionsMode, action: StreamOptionsAction, rejected: bool
) -> None:
    assert rejects(status, body, mode, action) is rejected


# --- backoff ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "cap"),
    [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (10, 2.0)],
    ids=str,
)
def test_backoff_is_full_jitter_up_to_the_doubling_cap(attempt: int, cap: float) -> None:
    rng = random.Random(attempt)
    waits = [backoff(attempt, rng) for _ in range(2000)]
    assert all(0.0 <= w <= cap for w in waits)
    assert min(waits) < 0.01 * cap  # the jitter spans the whole range...
    assert max(waits) > 0.99 * cap  # ...up to the cap


@pytest.mark.parametrize("retry_after", [0.0, 0.05, 7.5, 60.0], ids=str)
@pytest.mark.parametrize("attempt", [0, 3, 10], ids=lambda n: f"attempt-{n}")
def test_retry_after_wins_over_the_backoff(attempt: int, retry_after: float) -> None:
    rng = random.Random(0)
    before = rng.getstate()
    assert backoff(attempt, rng, retry_after) == retry_after
    assert rng.getstate() == before


# --- what the client is told: x-should-retry ------------------------------------------------


def _tried(*outcomes: AttemptOutcome) -> list[Attempt]:
    return [Attempt("u", "m", outcome) for outcome in outcomes]


@pytest.mark.parametrize(
    ("outcome", "attempts", "may"),
    [
        ("status_429", _tried("status_429"), True),  # retries: 0 — the SDK's backoff applies
        ("status_5xx", _tried("status_5xx"), True),
        ("connect_error", _tried("connect_error"), True),
        ("reset", _tried("reset"), True),
        ("first_token_timeout", _tried("first_token_timeout"), True),
        ("status_429", _tried("status_429", "status_429"), False),  # the proxy retried
        ("status_5xx", _tried("connect_error", "status_5xx"), False),  # it fell back
        ("status_5xx", _tried("status_5xx", "hedge_lost"), False),  # a hedge is a send too
        ("status_5xx", _tried("skipped_cooldown", "status_5xx"), True),  # one was skipped
        ("status_5xx", _tried("stream_options_rejected", "status_5xx"), True),  # one request
        ("timeout", _tried("timeout"), False),  # the upstream may still be generating
        ("tls_error", _tried("tls_error"), False),  # fails the same way until fixed
        ("status_4xx", _tried("status_4xx"), False),  # every upstream would say the same
    ],
)
def test_client_may_retry(outcome: AttemptOutcome, attempts: list[Attempt], may: bool) -> None:
    assert client_may_retry(outcome, attempts) is may


def test_a_spent_retry_budget_tells_the_client_not_to_retry() -> None:
    assert client_may_retry("status_5xx", _tried("status_5xx"), declined=True) is False


def test_a_timeout_of_an_upstream_that_allows_its_re_send_may_be_retried() -> None:
    assert client_may_retry("timeout", _tried("timeout"), retry_on_timeout=True) is True
    assert client_may_retry("timeout", _tried("timeout", "timeout"), retry_on_timeout=True) is False
