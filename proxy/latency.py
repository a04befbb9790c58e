"""Live time to first token per target: what `strategy: fastest`, outlier ejection and
`hedge_after: auto` read (pure: the clock reading and the random source are passed in).

One sample per committed stream: the seconds from sending the request to its first content
event, the moment `first_token_timeout` measures, divided by the prompt's size in units of
1k tokens (at least 1), so a burst of long prompts does not read as a slow upstream.

Two averages per target (upstream, model):
- the *cost*, a peak EWMA (Finagle's `PeakEwma`): a sample above it replaces it at once, one
  below pulls it by `ALPHA`; unread, it decays toward 0 with time constant `DECAY`, so a
  target that was slow is tried again once its cost has decayed below its peers' (about
  `DECAY * ln(slow / fast)` seconds later): no target starves, and the probes are a bounded
  share of traffic (one per that interval while its peers carry on).
- the *mean* and mean absolute deviation (plain EWMAs, as TCP's SRTT and RTTVAR), which
  outlier ejection and the `auto` hedge delay read: steadier than the peak.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from proxy.api_request import ApiRequest
from proxy.config import Config, Route, Target

ALPHA = 0.3  # weight of a new sample in every average
DECAY = 5.0  # seconds: an unsampled cost falls to 1/e of its value in this long
HEDGE_MIN_SAMPLES = 5  # `hedge_after: auto` hedges only once a target has this many
HEDGE_FLOOR = 1.5  # ... and never before this multiple of its mean
HEDGE_DEVIATIONS = 4.0  # ... nor before mean + this many mean absolute deviations
BYTES_PER_TOKEN = 4.0  # of the prompt as JSON: the size unit needs no tokenizer
REASON = "slow_first_token"  # the ejection reason label

Key = tuple[str, str]  # (upstream, model)
TtftObserver = Callable[[str, str, float], None]  # upstream, model, smoothed seconds
EjectObserver = Callable[[str, str, bool], None]  # upstream, model, ejected


def prompt_size(prompt_bytes: int) -> float:
    """The sample divisor: the prompt in units of 1k tokens, at least 1."""
    return max(1.0, prompt_bytes / (BYTES_PER_TOKEN * 1000.0))


@dataclass(slots=True)
class TargetLatency:
    cost: float = 0.0  # peak EWMA of normalised TTFT, as of `stamp`
    stamp: float = 0.0
    mean: float = 0.0
    dev: float = 0.0
    samples: int = 0  # since the last ejection ended
    ejected_until: float | None = None
    on_probation: bool = False  # back from an ejection: the first sample decides

    def cost_at(self, now: float) -> float:
        return self.cost * math.exp(-max(0.0, now - self.stamp) / DECAY)

    def add(self, sample: float, now: float) -> None:
        if self.samples == 0:
            self.cost, self.mean, self.dev = sample, sample, sample / 2
        else:
            cost = self.cost_at(now)
            self.cost = sample if sample > cost else cost + ALPHA * (sample - cost)
            self.dev += ALPHA * (abs(sample - self.mean) - self.dev)
            self.mean += ALPHA * (sample - self.mean)
        self.stamp = now
        self.samples += 1


class Latency:
    """Every target's statistics in this process; observers hear of each change."""

    def __init__(self) -> None:
        self._by_key: dict[Key, TargetLatency] = {}
        self.on_ttft: TtftObserver | None = None
        self.on_eject: EjectObserver | None = None

    def __getitem__(self, key: Key) -> TargetLatency:
        stats = self._by_key.get(key)
        if stats is None:
            stats = self._by_key[key] = TargetLatency()
        return stats

    def record(self, route: Route, target: Target, seconds: float, size: float, now: float) -> None:
        """A committed stream's first token came `seconds` after its request was sent."""
        key = (target.upstream, target.model)
        stats = self[key]
        stats.add(seconds / size, now)
        if self.on_ttft is not None:
            self.on_ttft(*key, stats.mean)
        if route.outliers.factor is not None and len(route.targets) > 1:  # else none to judge
            self._judge(route, target, now)
            self._reinstate(route, now)

    def _judge(self, route: Route, target: Target, now: float) -> None:
        stats, policy = self[(target.upstream, target.model)], route.outliers
        if policy.factor is None or stats.ejected_until is not None:
            return
        best = self._best_peer(route, target)
        if best is None:
            return  # fallbacks have no peers here: `best` is None for them
        enough = stats.on_probation or stats.samples >= policy.min_samples
        stats.on_probation = False
        if enough and stats.mean > policy.factor * best:
            stats.ejected_until = now + policy.seconds
            if self.on_eject is not None:
                self.on_eject(target.upstream, target.model, True)

    def _reinstate(self, route: Route, now: float) -> None:
        """Ends an ejection early once every peer has become slower than the ejected target
        was: it must not stay out while the ones left are slower still."""
        for t in route.targets:
            stats, best = self._by_key.get((t.upstream, t.model)), self._best_peer(route, t)
            if stats is None or stats.ejected_until is None or best is None:
                continue
            if stats.mean <= best:
                stats.ejected_until = now  # `ejected` ends it and forgets the statistics

    def _best_peer(self, route: Route, target: Target) -> float | None:
        if target not in route.targets:
            return None
        means = [
            self[(t.upstream, t.model)].mean
            for t in route.targets
            if t != target and self.usable((t.upstream, t.model))
        ]
        return min(means, default=None)

    def usable(self, key: Key) -> bool:
        stats = self._by_key.get(key)
        return stats is not None and stats.samples > 0 and stats.ejected_until is None

    def ejected(self, key: Key, now: float) -> bool:
        """Whether the target is out; an ejection that has run its time ends here, with its
        statistics forgotten so the next request probes it."""
        stats = self._by_key.get(key)
        if stats is None or stats.ejected_until is None:
            return False
        if now < stats.ejected_until:
            return True
        self._by_key[key] = TargetLatency(on_probation=True)
        if self.on_eject is not None:
            self.on_eject(*key, False)
        return False

    def hedge_delay(self, key: Key, size: float) -> float | None:
        """`hedge_after: auto`: past the target's usual first-token time, or None (no hedge)
        while it has too few samples."""
        stats = self._by_key.get(key)
        if stats is None or stats.samples < HEDGE_MIN_SAMPLES:
            return None
        usual = max(stats.mean + HEDGE_DEVIATIONS * stats.dev, HEDGE_FLOOR * stats.mean)
        return usual * size

    def keep_only(self, keys: set[Key]) -> None:
        """After a reload: forget targets that are gone."""
        for key in [k for k in self._by_key if k not in keys]:
            del self._by_key[key]


def targets_of(config: Config) -> set[Key]:
    """Every (upstream, model) a config routes to."""
    return {(t.upstream, t.model) for r in config.routes for t in (*r.targets, *r.fallbacks)}


def hedge_after(route: Route, first: Target, latency: Latency, request: ApiRequest) -> float | None:
    """The route's hedge delay for `request`, whose first candidate is `first`."""
    if route.hedge_after == "auto":
        return latency.hedge_delay((first.upstream, first.model), request_size(request))
    return route.hedge_after


def request_size(request: ApiRequest) -> float:
    """`prompt_size` of a request: one serialisation of its prompt, once per request."""
    return prompt_size(len(orjson.dumps(request.prompt)))


def fastest(
    targets: Sequence[Target],
    latency: Latency,
    inflight: Callable[[str], int],
    keys: dict[int, float],
    now: float,
) -> tuple[Target, ...]:
    """Power of two choices: the two highest weighted-random keys are drawn, the one with
    the lower cost x (in flight + 1) goes first (weights: who is drawn, and ties); the rest
    follow by that cost. A target without samples costs 0, so it is tried first."""

    def cost(t: Target) -> float:
        return latency[(t.upstream, t.model)].cost_at(now) * (inflight(t.upstream) + 1)

    by_key = sorted(targets, key=lambda t: keys[id(t)], reverse=True)
    pair = sorted(by_key[:2], key=cost)  # stable: equal costs keep the draw's order
    rest = sorted(by_key[2:] + pair[1:], key=cost)
    return (pair[0], *rest)


def draw_keys(targets: Sequence[Target], rng: random.Random) -> dict[int, float]:
    """Efraimidis-Spirakis keys (u ** (1/w)): highest first gives each target its weight's
    share of first place."""
    return {id(t): rng.random() ** (1.0 / t.weight) for t in targets}


def without_ejected(
    targets: tuple[Target, ...], latency: Latency, now: float
) -> tuple[Target, ...]:
    """Ejected targets move to the end: still there if every other candidate fails."""
    out = [t for t in targets if latency.ejected((t.upstream, t.model), now)]
    return (*(t for t in targets if t not in out), *out) if out else targets
