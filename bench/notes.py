"""bench/RESULTS.md: the command, the table, and notes on method and on what dominates."""

from __future__ import annotations

from typing import Any


def _mock_check(check: dict[str, Any]) -> list[str]:
    same = check["same_bytes"]
    return [
        "## Is the mock cheap enough?",
        "",
        f"Checked in every run, before the scenarios: {check['rounds']} bursts of 100 streams",
        "straight to each mock, then through a sluicegate (`pass`) in front of",
        "`sluicegate mock-upstream`, reading each process's utime+stime from /proc/<pid>/stat",
        "before and after each round (the load generator reads its own the same way).",
        "",
        "| CPU-s per 1,000 streams | `sluicegate mock-upstream` | `bench/lean_upstream.py` |",
        "|---|---|---|",
        f"| the mock | {check['sluicegate_mock_cpu_s_per_1k']:.2f} | "
        f"{check['lean_mock_cpu_s_per_1k']:.2f} |",
        f"| the load generator, same core | {check['sluicegate_client_cpu_s_per_1k']:.2f} | "
        f"{check['lean_client_cpu_s_per_1k']:.2f} |",
        f"| the proxy, for comparison | {check['proxy_cpu_s_per_1k']:.2f} | |",
        "",
        f"`sluicegate mock-upstream` costs {check['sluicegate_mock_share_of_proxy']:.0%} of the",
        "proxy's CPU per stream, and it shares core 0 with the load generator: at 1,000 streams",
        "opened at once that core saturates and inflates the direct floor. It also keeps a",
        "record of every request in memory, so its heap (and its GC pauses) grow over a run.",
        f"This run used the **{check['used']}** mock. Both send the same bytes: the lean mock",
        "builds them with `proxy.mock_content`, and the SSE bodies for one seed compare equal "
        f"(plain: {same['lean_mock_plain']}, with include_usage: "
        f"{same['lean_mock_include_usage']}; through sluicegate `pass`: "
        f"{same['proxy_pass_plain']} / {same['proxy_pass_include_usage']}).",
    ]


def _dominates(result: dict[str, Any]) -> list[str]:
    s100 = result["scenarios"]["streams_100"]
    lines = ["## What dominates", ""]
    for mode in ("sluicegate-pass", "sluicegate-auto"):
        row = s100[mode]
        lines.append(
            f"- `{mode}` at 100 concurrent (steady): {row['proxy_cpu_s_per_1k']:.2f} CPU-s per"
            f" 1,000 streams, {row['proxy_user_s_per_1k']:.2f} user +"
            f" {row['proxy_sys_s_per_1k']:.2f} kernel (loopback reads and writes)."
        )
    if "nginx" in s100:
        row = s100["nginx"]
        lines.append(
            f"- nginx: {row['proxy_cpu_s_per_1k']:.2f} ({row['proxy_user_s_per_1k']:.2f} user + "
            f"{row['proxy_sys_s_per_1k']:.2f} kernel): most of its cost is the kernel floor."
        )
    for name, data in (result.get("profile") or {}).items():
        if "packages" not in data:
            continue
        top = ", ".join(f"{p['name']} {p['percent']:.0f}%" for p in data["packages"][:6])
        fn = ", ".join(
            f"`{f['name'].split(' (')[0]}` {f['percent']:.0f}%" for f in data["self"][:5]
        )
        lines.append(f"- py-spy, `{name}`, self time by package: {top}. Top functions: {fn}.")
    if result.get("profile"):
        lines.append("- The full breakdown is in [PROFILE.md](PROFILE.md).")
    return lines


METHOD = """\
## Method

- Processes: the mock upstream and this load generator on core 0, each proxy (every process
  of it: sluicegate's uvicorn, nginx's master and worker) on core 1, pinned with
  `os.sched_setaffinity` as soon as each starts and again, with its children, once it
  answers. sluicegate runs as `python -m proxy serve --config <tmp routes.yaml> --port P`,
  one worker, its JSON access log to a file; one process per `stream_options` mode. nginx
  runs from a temporary config: one worker, `proxy_buffering off`, HTTP/1.1 keep-alive to
  the mock.
- The mock and this load generator run on the interpreter that runs this script;
  sluicegate and the floor on `--proxy-python PATH` if given, so that changing the proxy's
  interpreter leaves the harness as it was. *Versions* names the proxy's Python and
  packages (and the harness's Python when it differs); the container image
  (`deploy/Dockerfile`) ships Python 3.13.
- The *uvicorn+aiohttp floor* is `bench/floor_relay.py`: the thinnest streaming relay on
  sluicegate's own server and client (uvicorn with httptools and uvloop, one aiohttp
  session), with no routing, hold-back until the first token, metering, logs or timeouts.
  What it adds over direct is what those two libraries cost. A non-stream answer it reads
  whole and sends with its length, as sluicegate does. It runs in the stream rounds and the
  non-stream search (not the memory round), as a reference, and is not a product.
- Streams: 50 ms to the first token, 64 tokens 5 ms apart. TTFT runs from just before the
  request is written (connection taken from the pool or opened) to the read that completes
  the first SSE event whose `choices[0].delta.content` is non-empty (role chunks carry
  `""`). A stream counts as an error unless it is 200, has exactly 64 content events and
  ends with `data: [DONE]`. Added TTFT is the path's percentile minus the direct path's.
- Shapes: *1 stream* is streams one after another; *100 (200) concurrent (steady)* is 100
  (200) closed-loop clients whose first requests are spread over one stream's length, so
  requests arrive spread out as in production (the peers' "N concurrent"), measured after
  that ramp; *opened at once* fires every request of the round in the same instant, which
  shows the per-request set-up cost (all of it queues on the proxy's one core).
- Rounds are interleaved: each round loads every path in turn (the order rotating), after
  one unmeasured warm-up burst per path. The load generator reuses a connection idle for
  less than 4 s (uvicorn closes them at 5 s), so the 1,000-stream bursts open new
  connections on every path, as the peers' did.
- The machine is shared: before each round the run waits (up to 20 s) until other
  processes use < 10% of a core, and a round during which they used > 25% of a core is
  run again (at most twice); the table reports that foreign CPU and the repeats.
- CPU: utime+stime of every process of the proxy from /proc/<pid>/stat, read before and
  after each round of that path only, in 10 ms ticks (CLK_TCK = 100); the per-1,000
  figures sum hundreds of ticks. It is divided by every stream of the round, ramp included.
- Memory: VmRSS of every process of the proxy, on fresh processes (after 10 warm-up
  streams), before and at its peak while 1,000 slow streams are open at once.
- Non-stream: an open-loop generator (latency counted from each request's scheduled time,
  so a stall is not hidden), 8-token answers with no delay; the rate doubles from 500/s
  until a step has an error or p99 ≥ 50 ms, then bisects to within 10%. The direct figure
  is the ceiling of the mock and load generator sharing core 0. `auto` and `pass` differ
  only for streams, so only `pass` is searched (and the floor, as its reference).
"""


def provenance(meta: dict[str, Any]) -> list[str]:
    """Which command wrote the figures, when, on what machine and versions."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    machine = meta["machine"]
    return [
        f"Written by `{meta['command']}` on {meta['started']} ({meta['seconds']:.0f} s).",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}.",
        f"Versions: {versions}.",
    ]


def results_markdown(result: dict[str, Any], table_md: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        *provenance(result["meta"]),
        "",
        table_md,
        *_dominates(result),
        "",
        *_mock_check(result["mock_check"]),
        "",
        METHOD,
        "Every number, with the settings and error kinds, is in the JSON that",
        "`python bench/run.py --json PATH` writes.",
    ]
    return "\n".join(lines) + "\n"
