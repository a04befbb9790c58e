"""The soak's verdict from its samples: pure, no I/O (tests/test_soak.py feeds it made-up runs).

A soak fails on any lost or corrupted request, and on growth. Growth compares the median of
the first third of the samples taken after the warm-up with the median of the last third:
medians, because each sample is one instant of a fluctuating load (how many streams are open
right then), and thirds, so a slow leak has the most time between the two windows. After the
traffic stops, the proxy must also let go of everything: no request in flight, no connection
to an upstream, no socket waiting to be closed, file descriptors back to where they were
before the first request, one counted request for every request sent, and not one error-level
line in its log.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading, taken while the traffic runs."""

    at: float  # seconds since the traffic started
    requests: int  # finished so far
    lost: int  # lost or corrupted so far
    errors: int  # explicit errors so far (the mix expects them)
    rss: int  # the proxy's resident memory, bytes
    fds: int  # its open file descriptors
    pool: int  # its established TCP connections to the upstreams
    close_wait: int  # its sockets the peer closed and it did not
    clients: int  # established connections from clients
    inflight: float  # its sluicegate_inflight_requests


@dataclass(frozen=True, slots=True)
class Drained:
    """The proxy once the traffic stopped and it had time to let go."""

    baseline_fds: int  # before the first request
    fds: int
    pool: int
    close_wait: int
    inflight: float
    counted: int  # the sum of its sluicegate_requests_total
    sent: int  # requests the clients sent
    log_errors: int  # error-level lines and tracebacks in the proxy's log, over the whole run


@dataclass(frozen=True, slots=True)
class Limits:
    warmup: float = 60.0  # seconds: samples up to here are not judged for growth
    rss_ratio: float = 0.10  # growth fails when over both this share of the first window...
    rss_bytes: int = 20 * MB  # ...and this many bytes
    fd_growth: int = 50  # more file descriptors than this, last window over first: fail
    pool_growth: int = 50  # the same for upstream connections
    drain_fds: int = 0  # file descriptors over the baseline allowed after the drain
    min_samples: int = 3  # after the warm-up, to judge growth at all


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failures: list[str]
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # first, last median


def windows(values: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and the last third (at least one value each)."""
    width = max(1, math.ceil(len(values) / 3))
    return statistics.median(values[:width]), statistics.median(values[-width:])


def judge(samples: Sequence[Sample], drained: Drained, lost: int, limits: Limits) -> Verdict:
    failures = []
    if lost:
        failures.append(f"{lost} request(s) lost or corrupted")
    steady = [s for s in samples if s.at > limits.warmup]
    found: dict[str, tuple[float, float]] = {}
    if len(steady) < limits.min_samples:
        failures.append(
            f"{len(steady)} sample(s) after the {limits.warmup:g} s warm-up: growth needs "
            f"{limits.min_samples}; run longer or sample more often"
        )
    else:
        found = {
            "rss": windows([s.rss for s in steady]),
            "fds": windows([s.fds for s in steady]),
            "pool": windows([s.pool for s in steady]),
        }
        first, last = found["rss"]
        if last - first > max(limits.rss_ratio * first, limits.rss_bytes):
            failures.append(
                f"RSS grew from {first / MB:.1f} MB to {last / MB:.1f} MB (limit: "
                f"{limits.rss_ratio:.0%} and {limits.rss_bytes / MB:g} MB)"
            )
        for name, bound, what in (
            ("fds", limits.fd_growth, "open file descriptors"),
            ("pool", limits.pool_growth, "upstream connections"),
        ):
            first, last = found[name]
            if last - first > bound:
                failures.append(f"{what} grew from {first:g} to {last:g} (limit: +{bound})")
    failures += _drain_failures(drained, limits)
    return Verdict(not failures, failures, found)


def _drain_failures(d: Drained, limits: Limits) -> list[str]:
    out = []
    if d.inflight:
        out.append(f"{d.inflight:g} request(s) still in flight after the drain")
    if d.pool:
        out.append(f"{d.pool} upstream connection(s) still open after the drain")
    if d.close_wait:
        out.append(f"{d.close_wait} socket(s) in CLOSE_WAIT after the drain (never closed)")
    if d.fds > d.baseline_fds + limits.drain_fds:
        out.append(f"{d.fds} file descriptors after the drain, {d.baseline_fds} before the traffic")
    if d.counted != d.sent:
        out.append(f"the proxy counted {d.counted} requests, the clients sent {d.sent}")
    if d.log_errors:
        out.append(f"{d.log_errors} error-level line(s) or traceback(s) in the proxy's log")
    return out
