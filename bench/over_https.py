"""`python bench/run.py --https`: what an HTTPS upstream costs (issue 21), in one run.

The lean mock serves the same answers on a plain and a TLS port, with a CA and a server
certificate made for the run (proxy/mock/pki.py). The stream rounds of bench/run.py (1
stream, 100 concurrent steady, 100 opened at once) go, interleaved, to six targets: direct,
sluicegate `auto` and nginx to the plain port, and the same three to the TLS port. "direct
over HTTPS" is the load generator speaking TLS to the mock; the two proxies speak plain HTTP
to the load generator and HTTPS to the mock (sluicegate with `tls.ca_file`, nginx with
`proxy_ssl_verify on` and `proxy_ssl_session_reuse on`), so each path has one TLS hop and
added TTFT is over the direct path of the same scheme. First, each HTTPS target runs a round
of 100 streams opened at once, then three more; the mock's count of TLS connections shows
whether handshakes are paid once per connection or once per request.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import report
from loadgen import Pool, get_request, round_of
from notes import provenance
from procs import NginxHttps, free_port, nginx_binary, python, start_nginx
from run import FULL, HERE, LOAD_CORE, PROXY_CORE, QUICK, Bench, in_bench, wait_ready
from scenarios import STREAM, Shape, Target, streams

from proxy.mock.pki import make_pki

HEADINGS = {
    "direct": "direct",
    "sluicegate-auto": "sluicegate `auto`",
    "nginx": "nginx",
    "direct-https": "direct over HTTPS",
    "sluicegate-auto-https": "sluicegate `auto` over HTTPS",
    "nginx-https": "nginx over HTTPS",
}
REUSE_ROUNDS, REUSE_STREAMS = 3, 100


async def run(bench: Bench) -> dict[str, Any]:
    targets = await start_targets(bench)
    mock = next(p for p in bench.procs if p.name == "mock-lean")
    s, out = bench.settings, {}
    shapes = {
        "streams_1": (Shape("sequential", 1, count=s.c1_per_round), s.c1_rounds),
        "streams_100": (Shape("steady", 100, seconds=s.steady_seconds), s.steady_rounds),
        "streams_100_burst": (Shape("burst", 100), s.burst100_rounds),
    }
    try:
        for target in targets:  # a few requests each, so lazy set-up is in the baseline
            await streams([target], mock, Shape("burst", 10), 1, bench.machine)
        stats_port = targets[0].port
        tls = [t for t in targets if t.name.endswith("-https")]
        handshakes = {t.name: await tls_connections(t, stats_port) for t in tls}
        print(f"TLS connections opened: {handshakes}", flush=True)
        for key, (shape, rounds) in shapes.items():
            out[key] = await streams(targets, mock, shape, rounds, bench.machine)
            bench.progress(key, out[key])
        accepted = await mock_connections(stats_port)
    finally:
        for target in targets:
            target.pool.close()
    return {
        "scenarios": out,
        "tls_connections": handshakes,
        "mock_connections": accepted,  # over the run: plain, TLS, and TLS by version
        "placement": {p.name: p.affinity() for p in bench.procs},
        "waited_for_quiet_s": round(bench.machine.waited, 1),
    }


async def start_targets(bench: Bench) -> list[Target]:
    """The mock on both ports, sluicegate `auto` to each, nginx with a listener for each."""
    (bench.tmp / "pki").mkdir()
    pki = make_pki(bench.tmp / "pki")
    port, tls_port = free_port(), free_port()
    argv = python(str(HERE / "lean_upstream.py"), "--port", str(port), "--tls-port")
    argv += [str(tls_port), "--cert", str(pki.server_cert), "--key", str(pki.server_key)]
    mock = bench.start("mock-lean", argv, LOAD_CORE)
    await wait_ready(port, "/healthz", mock)
    client = ssl.create_default_context(cafile=pki.ca)
    direct = Target("direct", port, "mock-chat", None)
    plain, plain_port = bench.start_proxy("auto", port)
    https, https_port = bench.start_proxy(
        "auto", tls_port, "sluicegate-auto-https", ca_file=str(pki.ca)
    )
    for proc, proxy_port in ((plain, plain_port), (https, https_port)):
        await wait_ready(proxy_port, "/readyz", proc)
    targets = [direct, Target("sluicegate-auto", plain_port, "bench", plain)]
    targets.append(Target("direct-https", tls_port, "mock-chat", None, tls=client))
    targets.append(Target("sluicegate-auto-https", https_port, "bench", https))
    binary = None if bench.args.no_nginx else nginx_binary()
    if binary is not None:
        ports = free_port(), free_port()
        tls = NginxHttps(tls_port, ports[1], str(pki.ca))
        nginx = start_nginx(binary, port, ports[0], PROXY_CORE, bench.tmp, https=tls)
        bench.procs.append(nginx)
        await wait_ready(ports[0], "/healthz", nginx)
        await wait_ready(ports[1], "/healthz", nginx)
        targets.insert(2, Target("nginx", ports[0], "mock-chat", nginx))
        targets.append(Target("nginx-https", ports[1], "mock-chat", nginx))
    return targets


async def mock_connections(stats_port: int) -> dict[str, int]:
    """The connections the mock has accepted so far (its `GET /stats`)."""
    pool = Pool("127.0.0.1", stats_port)
    try:
        sample = await pool.fetch(get_request("127.0.0.1", stats_port, "/stats"), 5.0)
    finally:
        pool.close()
    return dict(orjson.loads(sample.body)["connections"])


async def tls_accepted(stats_port: int) -> int:
    return (await mock_connections(stats_port))["tls"]


async def tls_connections(target: Target, stats_port: int) -> list[int]:
    """TLS connections the mock accepted for a first round of REUSE_STREAMS streams opened at
    once through `target` (pools hold about 10 from the warm-up), then for REUSE_ROUNDS more."""
    request = target.request(STREAM)
    counts = [await tls_accepted(stats_port)]
    await round_of(target.pool, request, REUSE_STREAMS, 30.0)
    counts.append(await tls_accepted(stats_port))
    for _ in range(REUSE_ROUNDS):
        await round_of(target.pool, request, REUSE_STREAMS, 30.0)
    counts.append(await tls_accepted(stats_port))
    return [counts[1] - counts[0], counts[2] - counts[1]]


def _baseline(col: str) -> str:
    return "direct-https" if col.endswith("-https") else "direct"


def _cpu_ratio(data: dict[str, Any], over: Any) -> Any:
    """A cell: this column's proxy CPU per stream ÷ that of column `over(col)`."""

    def cell(c: str) -> str:
        other = over(c)
        if c.startswith("direct") or other not in data or other == c:
            return "-"
        return report._ratio(data[c]["proxy_cpu_s_per_1k"], data[other]["proxy_cpu_s_per_1k"])

    return cell


def _nginx(col: str) -> str:
    return "nginx-https" if col.endswith("-https") else "nginx"


def _plain(col: str) -> str:
    return col.removesuffix("-https")


def table(result: dict[str, Any]) -> str:
    sc, made = result["scenarios"], result["tls_connections"]
    cols = [c for c in HEADINGS if c in sc["streams_100"]]
    s100, burst = sc["streams_100"], sc["streams_100_burst"]
    keys = ("streams_1", "streams_100", "streams_100_burst")
    ttft = "TTFT p50 / p99 ms, {} (added over direct, same scheme)"
    body = [
        report._ttft_row(ttft.format("1 stream"), sc["streams_1"], cols, _baseline),
        report._ttft_row(ttft.format("100 concurrent, steady"), s100, cols, _baseline),
        report._ttft_row(ttft.format("100 opened at once"), burst, cols, _baseline),
    ]
    cells = {
        "stream errors (1 / 100 / 100 at once)": lambda c: " / ".join(
            str(sc[k][c]["errors"]) for k in keys
        ),
        "proxy CPU-s per 1,000 streams, 100 steady (user+sys)": report._cpu_cell(s100),
        "proxy CPU-s per 1,000 streams, 100 at once": report._cpu_cell(burst),
        "mock CPU-s per 1,000 streams, 100 steady": report._mock_cell(s100),
        "CPU per stream ÷ nginx's (same scheme), 100 steady": _cpu_ratio(s100, _nginx),
        "CPU per stream ÷ nginx's (same scheme), 100 at once": _cpu_ratio(burst, _nginx),
        "CPU per stream over HTTPS ÷ over HTTP, 100 steady": _cpu_ratio(s100, _plain),
        "CPU per stream over HTTPS ÷ over HTTP, 100 at once": _cpu_ratio(burst, _plain),
        f"TLS connections the mock accepted: {REUSE_STREAMS} at once / {REUSE_ROUNDS} more times": (
            lambda c: " / ".join(map(str, made[c])) if c in made else "-"
        ),
        "other load during stream rounds: CPU-s / rounds repeated": lambda c: (
            f"{sum(sc[k][c]['foreign_cpu_s'] for k in keys):.1f} / "
            f"{sum(sc[k][c]['rounds_repeated'] for k in keys)}"
        ),
    }
    body += [report._per_col(label, cols, cell) for label, cell in cells.items()]
    return report.markdown([HEADINGS[c] for c in cols], body)


def write_section(path: Path, section: str) -> None:
    """Put `section` (headed report.HTTPS_SECTION) in RESULTS.md: in place of the one there,
    else at the end."""
    text = path.read_text()
    start = text.find(report.HTTPS_SECTION)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + len(report.HTTPS_SECTION))
    rest = text[end + 1 :] if end >= 0 else ""
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def main(args: argparse.Namespace, command: str, started: float) -> None:
    result = in_bench(args, run)
    settings = asdict(QUICK if args.quick else FULL)
    result["meta"] = report.meta(command, started, settings, STREAM, args.proxy_python)
    if args.json:
        args.json.write_text(report.to_json(result))
    table_md = table(result)
    print(table_md)
    if args.write_results:
        lines = [report.HTTPS_SECTION, "", *provenance(result["meta"]), "", table_md, "", NOTES]
        write_section(HERE / "RESULTS.md", "\n".join(lines))


NOTES = f"""\
How: `python bench/run.py --https` (bench/over_https.py): the lean mock on a plain and a TLS
port (ECDSA P-256 certificate from a CA made for the run; TLS 1.3 on every hop),
sluicegate `auto` to each (`tls.ca_file`), nginx with a listener for each (`proxy_ssl_verify on`,
`proxy_ssl_session_reuse on`, `keepalive 1024` in the upstream block). The load generator
reaches the proxies over plain HTTP and the mock over TLS for "direct over HTTPS", so every
path has one TLS hop; added TTFT is over the direct path of the same scheme. Placement as
in bench/run.py: mock and load generator on core 0, the proxies on core 1. The machine is
shared: the last row is the CPU other work used during the rounds (a round run beside too
much of it is repeated, at most twice), so compare columns of one run, not runs. The TLS
connections row counts the connections the mock's TLS port accepted (the JSON has them by
TLS version, `mock_connections`), before the rounds
above, for a first round of {REUSE_STREAMS} streams opened at once (each pool held about 10
from a warm-up burst) and then for {REUSE_ROUNDS} more such rounds: 0 there means every
request reused a connection, and paid no handshake.
"""
