"""Route planning and failure classification (pure).

`plan` turns a route into the ordered candidates for one request; `outcome_of`,
`outcome_for_status` and `rejects_stream_options` name how an attempt failed; `classify`
decides, for each way an attempt can fail, whether the request is sent again (the next
candidate) and whether the failure counts against the upstream's health; `client_may_retry`
whether the client should send it again. Every rule says which upstream behaviour it answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.api_request import StreamOptionsAction
from proxy.config import Route, StreamOptionsMode, Target
from proxy.errors import (
    BadRequest,
    ProxyError,
    Untranslatable,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from proxy.latency import Latency, draw_keys, fastest, without_ejected
from proxy.record import Attempt, AttemptOutcome


def plan(
    route: Route,
    rng: random.Random,
    inflight: Callable[[str], int],
    latency: Latency | None = None,
    now: float = 0.0,
) -> tuple[Target, ...]:
    """Targets in strategy order, then fallbacks in their configured order.

    weighted: Efraimidis-Spirakis keys (u ** (1/w), highest first) give each target its
    weight's share of first place and a sensible order for the rest.
    least_inflight: fewest requests in flight first; ties broken by the weighted draw.
    fastest: power of two choices over live first-token latency (`latency.fastest`).
    With `latency`, targets ejected as outliers go last, whatever the strategy.
    """
    targets = route.targets
    if len(targets) > 1:
        keys = draw_keys(targets, rng)
        if route.strategy == "least_inflight":
            targets = tuple(sorted(targets, key=lambda t: (inflight(t.upstream), -keys[id(t)])))
        elif route.strategy == "fastest" and latency is not None:
            targets = fastest(targets, latency, inflight, keys, now)
        else:
            targets = tuple(sorted(targets, key=lambda t: keys[id(t)], reverse=True))
        if latency is not None:
            targets = without_ejected(targets, latency, now)
    return targets + route.fallbacks


@dataclass(frozen=True, slots=True)
class Verdict:
    next_candidate: bool  # try the next candidate (else: this answer goes to the client)
    unhealthy: bool  # counts toward the upstream's cooldown


# Which failures re-send the request (to the next candidate, or to the same upstream again),
# and why. A re-send is safe when the upstream is not working on the request any more: it
# never got it, it refused it, or it answered. It is not when the request went out and the
# proxy stopped waiting: the upstream may still be generating, and billing, that answer.
_VERDICTS: dict[AttemptOutcome, Verdict] = {
    # Refused or unreachable (a connect timeout too): nothing was sent.
    "connect_error": Verdict(next_candidate=True, unhealthy=True),
    # Sent, then no headers (or no end of the body, or a silence past `idle`) in time: the
    # upstream may still be generating. Not re-sent, unless the upstream is marked
    # `retry_on_timeout` (a self-hosted server that stops when the proxy hangs up).
    "timeout": Verdict(next_candidate=False, unhealthy=True),
    # The connection dropped before an answer (a reset before or after the headers, a cut
    # body, a 200 without an answer). Ambiguous, but the upstream hung up itself: it is not
    # delivering this answer to anyone. Usually a stale pooled connection, a load balancer
    # shedding load, a crashed worker: a re-send is what cures those (the SDKs do the same).
    "reset": Verdict(next_candidate=True, unhealthy=True),
    # The upstream answered: it is not generating any more, so a re-send is safe.
    "status_5xx": Verdict(next_candidate=True, unhealthy=True),
    # DeepSeek under load: headers and keep-alives for minutes, no tokens. The route asked
    # for this deliberately (`first_token_timeout`): the one timeout that moves on.
    "first_token_timeout": Verdict(next_candidate=True, unhealthy=True),
    # An error event in place of the first token (overload reported in-stream).
    "stream_error": Verdict(next_candidate=True, unhealthy=True),
    # A certificate that fails verification fails every request the same way until someone
    # changes the certificate or the config: another upstream may answer, this one never
    # gets a retry (`retried`), and it counts toward cooldown so that later requests skip it
    # and only a probe finds out when it is fixed.
    "tls_error": Verdict(next_candidate=True, unhealthy=True),
    # Rate limits are about us, not the upstream's health: move on, no cooldown.
    "status_429": Verdict(next_candidate=True, unhealthy=False),
    # A wrong key or a model the upstream lacks: a fallback elsewhere may still answer.
    "status_auth": Verdict(next_candidate=True, unhealthy=False),
    # Past a byte limit: another upstream may answer smaller; this one is not broken for it.
    "too_large": Verdict(next_candidate=True, unhealthy=False),
    # A Responses request a `responses: chat` upstream cannot take (stored state, built-in
    # tools): a native upstream of the route may; this one would refuse it every time.
    "untranslatable": Verdict(next_candidate=True, unhealthy=False),
    # The request itself is wrong (400, 413, 422...): every upstream would say the same.
    "status_4xx": Verdict(next_candidate=False, unhealthy=False),
}
_RESENT_TIMEOUT = Verdict(next_candidate=True, unhealthy=True)
# Attempts that did not send the request (or sent it again at once, without stream_options).
_NOT_SENT = frozenset({"skipped_cooldown", "stream_options_rejected"})


def classify(outcome: AttemptOutcome, *, retry_on_timeout: bool = False) -> Verdict:
    """`retry_on_timeout`: the failed upstream's setting of that name."""
    if outcome == "timeout" and retry_on_timeout:
        return _RESENT_TIMEOUT
    return _VERDICTS.get(outcome, Verdict(next_candidate=False, unhealthy=False))


def retried(outcome: AttemptOutcome) -> bool:
    """Whether the same upstream may be tried again in this request after this outcome."""
    return outcome not in ("tls_error", "untranslatable")


def client_may_retry(
    outcome: AttemptOutcome,
    attempts: Sequence[Attempt],
    *,
    retry_on_timeout: bool = False,
    declined: bool = False,
) -> bool:
    """Whether the client may send again the request that ended in this failure: not when
    the proxy already sent it more than once (its retries and fallbacks were the retries),
    nor when it declined a re-send because the upstream's retry budget is spent (`declined`),
    nor after a failure it would not re-send itself. Otherwise (one attempt: `retries: 0`,
    or a Retry-After too long to wait for) the client's own backoff applies. The answer
    then carries `x-should-retry: false`, which the OpenAI SDKs obey."""
    if declined or sum(a.outcome not in _NOT_SENT for a in attempts) > 1:
        return False
    return classify(outcome, retry_on_timeout=retry_on_timeout).next_candidate and retried(outcome)


def outcome_for_status(status: int) -> AttemptOutcome:
    if status == 429:
        return "status_429"
    if status in (401, 403, 404):
        return "status_auth"
    if status >= 500:
        return "status_5xx"
    return "status_4xx"


# Our own errors by class (a subclass before its base); any other is a reset.
_OUTCOMES_OF: tuple[tuple[type[ProxyError], AttemptOutcome], ...] = (
    (Untranslatable, "untranslatable"),
    (BadRequest, "status_4xx"),  # the request cannot go to this upstream as it is
    (UpstreamUnreachable, "connect_error"),
    (UpstreamTlsError, "tls_error"),
    (UpstreamTimeout, "timeout"),
    (UpstreamTooLarge, "too_large"),
)


def outcome_of(error: ProxyError) -> AttemptOutcome:
    """Our own error for an attempt (see `upstream.to_proxy_error`): which failure it was."""
    return next((outcome for kind, outcome in _OUTCOMES_OF if isinstance(error, kind)), "reset")


def rejects_stream_options(
    status: int, body: bytes, mode: StreamOptionsMode, action: StreamOptionsAction
) -> bool:
    """A 400 naming `stream_options`, to a request sent with it in `auto` mode: an upstream
    that does not know the field. The request goes again at once without it (`attempts`)."""
    return status == 400 and mode == "auto" and action != "strip" and b"stream_options" in body


def backoff(attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff (0.1 s doubling, capped at 2 s), or Retry-After."""
    if retry_after is not None:
        return retry_after
    return rng.uniform(0, min(2.0, 0.1 * 2**attempt))
