"""The soak's output: one line per sample, the final summary, and bench/SOAK.md."""

from __future__ import annotations

import json
from typing import Any

from soak_traffic import BACKUP, CASES, Abort, Answer, Cut, Expect, Refused, Relayed
from soak_verdict import MB, Sample

KINDS = ("answered", "cut", "error", "aborted", "gave_up", "lost")


def describe(expect: Expect) -> str:
    """What the client must get, in words (tests/README.md and bench/SOAK.md)."""
    if isinstance(expect, Answer):
        said = "the backup's answer" if expect.models == (BACKUP,) else "the answer"
        if expect.text_only:
            said = "the answer's text, as an SSE stream"
        elif expect.keepalives:
            said = f"{expect.keepalives} keep-alive comments, then the answer (or the backup's)"
    elif isinstance(expect, Cut):
        said = f"200, {expect.events} content event(s), then an error event `{expect.code}`"
        said += " (or the backup's answer)" if expect.or_backup else ""
    elif isinstance(expect, Relayed):
        said = f"the upstream's {expect.status} as it was"
        said += f", `Retry-After: {expect.retry_after}`" if expect.retry_after else ""
    elif isinstance(expect, Refused):
        said = f"{expect.status} `{expect.code}` in OpenAI's shape"
    elif isinstance(expect, Abort):
        said = f"the answer's first bytes (the client leaves after {expect.events} events)"
    else:
        said = f"nothing (the client leaves after {expect.seconds:g} s)"
    return said


def line(samples: list[Sample]) -> str:
    s = samples[-1]
    before = samples[-2] if len(samples) > 1 else None
    since = s.at - (before.at if before else 0.0)
    rate = (s.requests - (before.requests if before else 0)) / since if since else 0.0
    return (
        f"[{s.at:7.1f} s] requests {s.requests:>8,} ({rate:5.0f}/s)  errors {s.errors:>6,}  "
        f"lost {s.lost}  | RSS {s.rss / MB:6.1f} MB  fds {s.fds:>4}  upstream conns "
        f"{s.pool:>3}  close_wait {s.close_wait}  clients {s.clients:>3}  "
        f"in flight {s.inflight:g}"
    )


def _growth(result: dict[str, Any]) -> list[str]:
    windows = result["verdict"]["windows"]
    if not windows:
        return []
    rss, fds, pool = windows["rss"], windows["fds"], windows["pool"]
    return [
        f"RSS {rss[0] / MB:.1f} MB -> {rss[1] / MB:.1f} MB ({(rss[1] - rss[0]) / MB:+.1f} MB), "
        f"fds {fds[0]:g} -> {fds[1]:g}, upstream connections {pool[0]:g} -> {pool[1]:g} "
        "(medians of the first and last third of the samples after the warm-up)"
    ]


def headline(result: dict[str, Any]) -> str:
    counts = result["counts"]
    return f"{sum(counts.values()):,} requests in {result['traffic_seconds']:g} s: " + ", ".join(
        f"{k} {counts.get(k, 0):,}" for k in KINDS
    )


def summary(result: dict[str, Any]) -> str:
    verdict, d = result["verdict"], result["drained"]
    lines = [
        f"{'PASS' if verdict['passed'] else 'FAIL'}: {headline(result)}",
        *_growth(result),
        f"after the traffic ({result['drain_seconds']:g} s): in flight {d['inflight']:g}, "
        f"upstream conns {d['pool']}, close_wait {d['close_wait']}, fds {d['fds']} "
        f"(before the traffic: {d['baseline_fds']}), counted {d['counted']:,} of "
        f"{d['sent']:,} sent; proxy log errors: {d['log_errors']}",
    ]
    lines += [f"  - {failure}" for failure in verdict["failures"]]
    lines += [f"  lost: {x['case']} seed {x['seed']}: {x['why']}" for x in result["lost_examples"]]
    return "\n".join(lines)


def _samples_table(samples: list[dict[str, Any]]) -> list[str]:
    out = [
        "| t (s) | requests | req/s | errors | lost | RSS (MB) | fds | upstream conns "
        "| CLOSE_WAIT | client conns | in flight |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = {"at": 0.0, "requests": 0}
    for s in samples:
        rate = (s["requests"] - previous["requests"]) / max(s["at"] - previous["at"], 1e-9)
        out.append(
            f"| {s['at']:g} | {s['requests']:,} | {rate:.0f} | {s['errors']:,} | {s['lost']} "
            f"| {s['rss'] / MB:.1f} | {s['fds']} | {s['pool']} | {s['close_wait']} "
            f"| {s['clients']} | {s['inflight']:g} |"
        )
        previous = s
    return out


def mix_table(cases: dict[str, dict[str, int]] | None = None) -> list[str]:
    """The request mix as a Markdown table; with a run's counts, one column per outcome."""
    kinds = KINDS if cases is not None else ()
    out = [
        "| case | route | stream | fault knobs | the client must get | weight |"
        + "".join(f" {k} |" for k in kinds),
        "|---|---|---|---|---|---:|" + "---:|" * len(kinds),
    ]
    for case in CASES:
        fault = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in case.fault.items()) or "-"
        stream = "yes" if case.stream else "no"
        row = f"| {case.name} | {case.route} | {stream} | {fault} | {describe(case.expect)} |"
        row += f" {case.weight} |"
        got = (cases or {}).get(case.name, {})
        out.append(row + "".join(f" {got.get(k, 0):,} |" for k in kinds))
    return out


def _metrics_lines(seen: dict[str, float]) -> list[str]:
    out = ["| counter | upstream | outcome / reason | count |", "|---|---|---|---:|"]
    for key, value in seen.items():
        kind, *rest = key.split(" ")
        upstream, why = (rest[0], rest[1]) if len(rest) == 2 else ("", rest[0])
        out.append(f"| {kind} | {upstream} | {why} | {value:,.0f} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    meta, settings = result["meta"], result["settings"]
    verdict, d = result["verdict"], result["drained"]
    minutes = settings["minutes"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "nginx")
    machine = meta["machine"]
    failures = [f"- {f}" for f in verdict["failures"]] or ["- none"]
    return "\n".join(
        [
            "# Soak",
            "",
            f"Written by a **{minutes:g}-minute** run on {meta['started']}:",
            "",
            f"    {meta['command']}",
            "",
            *([SHORT_RUN, ""] if minutes < 30 else []),
            f"**{'PASS' if verdict['passed'] else 'FAIL'}**: {headline(result)}.",
            "",
            *[f"{g}." for g in _growth(result)],
            "",
            "Failures:",
            "",
            *failures,
            "",
            "## How it runs",
            "",
            "`bench/soak.py` starts three processes on loopback: the proxy (`python -m proxy "
            "serve`, one process), a faulty mock upstream that obeys per-request fault knobs "
            "and resets every connection on a second port, and a healthy backup (both "
            "`bench/soak_upstream.py`, i.e. `proxy.mock.upstream`). "
            f"{settings['concurrency']} clients send the mix below back to back. Every answer "
            "is compared byte for byte with the mock's deterministic answer for its seed and "
            "length; a fault must end in the backup's answer (a route with a fallback), the "
            "upstream's own error as it was, the proxy's error in OpenAI's shape, or, once a "
            "stream began, one SSE error event. A wrong byte, a silent truncation or no answer "
            "within 30 s is a lost request.",
            "",
            f"Every {settings['sample_seconds']:g} s: the proxy's RSS (`/proc/PID/status`), "
            "open file descriptors (`/proc/PID/fd`), TCP connections by state (its socket "
            "inodes in `/proc/PID/net/tcp`) and `sluicegate_inflight_requests`.",
            "",
            "## Samples",
            "",
            *_samples_table(result["samples"]),
            "",
            "## After the traffic",
            "",
            f"Waited {result['drain_seconds']:g} s for the proxy to let go. In flight "
            f"{d['inflight']:g}; upstream connections {d['pool']}; CLOSE_WAIT sockets "
            f"{d['close_wait']}; file descriptors {d['fds']} (before the first request: "
            f"{d['baseline_fds']}); requests counted in `sluicegate_requests_total` "
            f"{d['counted']:,}, sent {d['sent']:,}. Error-level lines in the proxy's log: "
            f"{d['log_errors']}.",
            "",
            "## Requests by case",
            "",
            *mix_table(result["cases"]),
            "",
            "What the proxy counted in `/metrics` over the run (attempts by upstream and "
            "outcome, fallbacks and cut streams by reason):",
            "",
            *_metrics_lines(result["proxy_metrics"]),
            "",
            "## Limits",
            "",
            *_limits(result),
            "",
            "## Versions and machine",
            "",
            f"{versions}; {machine['cores']} cores ({machine['cpu']}), Linux "
            f"{machine['kernel']}. The proxy used {result['proxy_cpu_seconds']:g} CPU-seconds "
            f"in {result['traffic_seconds']:g} s; the load average at the end was "
            + ", ".join(f"{x:g}" for x in result["load_average"])
            + " (the machine is shared: other processes ran beside the soak).",
            "",
        ]
    )


SHORT_RUN = (
    "> A shorter run than the 30-minute soak the acceptance asks for "
    "(`python bench/soak.py --write-results` rewrites this file)."
)
LIMITS_TEXT = """\
Samples in the first {warmup:g} s are not judged (imports finish, pools and caches fill).
Growth compares the median of the first third of the remaining samples with the median of
the last third. RSS fails when it grows by more than {ratio:.0%} **and** more than
{rss_mb:g} MB; open file descriptors and upstream connections fail when they grow by more
than {fds} and {pool} (the concurrency). After the drain nothing may be left: no request in
flight, no upstream connection, no CLOSE_WAIT socket, no file descriptor over the count before
the first request, one counted request per request sent, and no error-level line in the
proxy's log.

Why these numbers. After the warm-up a healthy proxy's RSS is flat to about a megabyte (this
run: {rss_low:.1f} to {rss_high:.1f} MB), but Python's allocator keeps arenas it once needed,
so RSS follows the busiest moment so far and a bound must sit well above that noise. The two
windows are {between:,} requests apart in this run, so {rss_mb:g} MB is
{per_request:,.0f} bytes per request: a leak of more than that per request fails it (the
longer the run, the smaller that is). The {ratio:.0%} keeps the rule meaningful for a larger
baseline. File descriptors and upstream connections follow the number of streams in
flight at the instant of each sample (this run: {fds_low} to {fds_high} descriptors,
{pool_low} to {pool_high} connections), so their bound is a whole concurrency; the drain check
is the exact one: a single descriptor over the baseline fails a run of any length."""


def _limits(result: dict[str, Any]) -> list[str]:
    limits, samples = result["settings"]["limits"], result["samples"]
    steady = [s for s in samples if s["at"] > limits["warmup"]] or samples
    width = max(1, -(-len(steady) // 3))  # the windows of soak_verdict.windows
    middle = (width - 1) // 2
    between = max(1, steady[-1 - middle]["requests"] - steady[middle]["requests"])
    return LIMITS_TEXT.format(
        warmup=limits["warmup"],
        ratio=limits["rss_ratio"],
        rss_mb=limits["rss_bytes"] / MB,
        fds=limits["fd_growth"],
        pool=limits["pool_growth"],
        rss_low=min(s["rss"] for s in steady) / MB,
        rss_high=max(s["rss"] for s in steady) / MB,
        between=between,
        per_request=limits["rss_bytes"] / between,
        fds_low=min(s["fds"] for s in steady),
        fds_high=max(s["fds"] for s in steady),
        pool_low=min(s["pool"] for s in steady),
        pool_high=max(s["pool"] for s in steady),
    ).splitlines()
