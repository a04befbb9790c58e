"""The results as a Markdown table, JSON, and bench/RESULTS.md."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import CLK_TCK, REPO, nginx_binary, nginx_version

COLUMNS = (
    "direct",
    "sluicegate-pass",
    "sluicegate-auto",
    "sluicegate-auto-usage",
    "floor",
    "nginx",
)
HEADINGS = {
    "direct": "direct",
    "sluicegate-pass": "sluicegate `pass`",
    "sluicegate-auto": "sluicegate `auto`, no usage asked (SDK default)",
    "sluicegate-auto-usage": "sluicegate `auto`, usage asked",
    "floor": "uvicorn+aiohttp floor",
    "nginx": "nginx",
}
PACKAGES = ("uvicorn", "aiohttp", "uvloop", "httptools", "starlette")


_VERSIONS = """
import json, platform, sys
from importlib import metadata
out = {"python": platform.python_version()}
for name in sys.argv[1:]:
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = "not installed"
print(json.dumps(out))
"""


def versions(proxy_python: str = "") -> dict[str, str]:
    """The proxy's interpreter and packages (`--proxy-python`, else this one's), nginx, the
    commit; the harness's Python too when the proxy runs on another."""
    python = proxy_python or sys.executable
    found = subprocess.run(
        [python, "-c", _VERSIONS, *PACKAGES], capture_output=True, text=True, timeout=60, check=True
    )
    out: dict[str, str] = json.loads(found.stdout)
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        out["harness python"] = platform.python_version()
    binary = nginx_binary()
    out["nginx"] = nginx_version(binary) if binary else "not installed"
    out["sluicegate"] = _git("rev-parse", "--short", "HEAD") + (
        "+dirty" if _git("status", "--porcelain", "proxy") else ""
    )
    return out


def _git(*args: str) -> str:
    run = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
    )
    return run.stdout.strip()


def meta(
    command: str,
    started: float,
    settings: dict[str, Any],
    stream: dict[str, Any],
    proxy_python: str = "",
) -> dict[str, Any]:
    return {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "versions": versions(proxy_python),
        "machine": {
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "cpu": _cpu_model(),
            "clk_tck": CLK_TCK,
        },
        "settings": {**settings, "stream": stream},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def to_json(result: dict[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) else round(value, 4)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(result), indent=2, ensure_ascii=False) + "\n"


def brief(data: dict[str, Any]) -> str:
    """One line of progress per scenario."""
    parts = []
    for name, row in data.items():
        if "ttft_p50_ms" in row:
            parts.append(f"{name} ttft {row['ttft_p50_ms']:.1f}/{row['ttft_p99_ms']:.1f} ms")
            parts.append(f"cpu {row['proxy_cpu_s_per_1k']:.2f} s/1k err {row['errors']}")
        elif "rss_growth_mb" in row:
            parts.append(f"{name} +{row['rss_growth_mb']:.1f} MB err {row['errors']}")
        elif "max_rate" in row:
            parts.append(f"{name} {row['max_rate']:.0f} req/s")
    return "; ".join(parts)


def _direct(_col: str) -> str:
    return "direct"


def _f(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ttft_row(
    label: str, rows: dict[str, Any], cols: list[str], baseline: Callable[[str], str] = _direct
) -> list[str]:
    """Each column's TTFT over its baseline's; the baselines' own, absolute."""
    cells = []
    for col in cols:
        row, base = rows[col], rows[baseline(col)]
        if col == baseline(col):
            cells.append(f"{_f(row['ttft_p50_ms'])} / {_f(row['ttft_p99_ms'])} abs.")
            continue
        p50 = row["ttft_p50_ms"] - base["ttft_p50_ms"]
        p99 = row["ttft_p99_ms"] - base["ttft_p99_ms"]
        cells.append(f"{_f(p50, 2, True)} / {_f(p99, 2, True)}")
    return [label, *cells]


def _per_col(label: str, cols: list[str], cell: Any) -> list[str]:
    return [label, *(cell(c) for c in cols)]


def rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sc = result["scenarios"]
    cols = [c for c in COLUMNS if c in sc["streams_100"]]
    out = [
        _ttft_row("TTFT p50 / p99 ms, 1 stream (added over direct)", sc["streams_1"], cols),
        _ttft_row("TTFT p50 / p99 ms, 100 concurrent (steady)", sc["streams_100"], cols),
        *(
            [_ttft_row("TTFT p50 / p99 ms, 200 concurrent (steady)", sc["streams_200"], cols)]
            if "streams_200" in sc
            else []
        ),
        _ttft_row("TTFT p50 / p99 ms, 100 opened at once", sc["streams_100_burst"], cols),
        _ttft_row("TTFT p50 / p99 ms, 1,000 opened at once", sc["streams_1000"], cols),
    ]
    s100, s1k, mem, ns = sc["streams_100"], sc["streams_1000"], sc["memory"], sc["nonstream"]
    out += [
        _per_col(
            "total p50 / p99 ms, 100 concurrent",
            cols,
            lambda c: f"{_f(s100[c]['total_p50_ms'])} / {_f(s100[c]['total_p99_ms'])}",
        ),
        _per_col(
            "streams/s, 100 steady / 1,000 at once",
            cols,
            lambda c: f"{s100[c]['streams_per_s']:.0f} / {s1k[c]['streams_per_s']:.0f}",
        ),
        _per_col(
            "stream errors (1 / 100 / 100 at once / 1,000)",
            cols,
            lambda c: " / ".join(str(sc[k][c]["errors"]) for k in _STREAM_KEYS),
        ),
        _per_col("proxy CPU-s per 1,000 streams, 100 steady (user+sys)", cols, _cpu_cell(s100)),
        _per_col("proxy CPU-s per 1,000 streams, 1,000 at once", cols, _cpu_cell(s1k)),
        _per_col("mock CPU-s per 1,000 streams, 100 steady", cols, _mock_cell(s100)),
        _per_col("RSS MB before → 1,000 open streams", cols, _rss_cell(mem)),
        _per_col("RSS growth MB per 1,000 open streams (errors)", cols, _growth_cell(mem)),
        _per_col("non-stream req/s per worker, p99 < 50 ms", cols, _rate_cell(ns)),
        _per_col("non-stream p99 ms / proxy CPU ms per req at that rate", cols, _rate_p99(ns)),
        _per_col(
            "other load during stream rounds: CPU-s / rounds repeated",
            cols,
            lambda c: (
                f"{sum(sc[k][c]['foreign_cpu_s'] for k in _STREAM_KEYS):.1f} / "
                f"{sum(sc[k][c]['rounds_repeated'] for k in _STREAM_KEYS)}"
            ),
        ),
    ]
    if "nginx" in cols:
        out += _ratio_rows(sc, cols)
    return [HEADINGS[c] for c in cols], out


_STREAM_KEYS = ("streams_1", "streams_100", "streams_100_burst", "streams_1000")


def ttft_table(ttft: dict[str, dict[str, Any]]) -> str:
    """`run.py --ttft-only`: added TTFT and the proxy's CPU at each concurrency."""
    cols = ["direct", "sluicegate-pass"]
    body = []
    for n, data in ttft.items():
        body.append(_ttft_row(f"TTFT p50 / p99 ms, {n} concurrent (added over direct)", data, cols))
        body.append(
            _per_col(f"proxy CPU-s per 1,000 streams, {n} concurrent", cols, _cpu_cell(data))
        )
        body.append(
            _per_col(f"stream errors, {n} concurrent", cols, lambda c, d=data: str(d[c]["errors"]))
        )
    return markdown([HEADINGS[c] for c in cols], body)


def _cpu_cell(data: dict[str, Any]) -> Any:
    def cell(c: str) -> str:
        if c.startswith("direct"):  # no proxy there
            return "-"
        row = data[c]
        user, system = row["proxy_user_s_per_1k"], row["proxy_sys_s_per_1k"]
        return f"{row['proxy_cpu_s_per_1k']:.2f} ({user:.2f}+{system:.2f})"

    return cell


def _mock_cell(data: dict[str, Any]) -> Any:
    return lambda c: f"{data[c]['mock_cpu_s_per_1k']:.2f}"


def _rss_cell(mem: dict[str, Any]) -> Any:
    def cell(c: str) -> str:
        row = mem.get(c)
        return f"{row['rss_before_mb']:.1f} → {row['rss_open_mb']:.1f}" if row else "-"

    return cell


def _growth_cell(mem: dict[str, Any]) -> Any:
    def cell(c: str) -> str:
        row = mem.get(c)
        return f"{row['rss_growth_mb']:.1f} ({row['errors']})" if row else "-"

    return cell


def _rate_cell(ns: dict[str, Any]) -> Any:
    def cell(c: str) -> str:
        row = ns.get(c)
        if not row:
            return "same as `pass`" if c == "sluicegate-auto" else "-"
        return f"{'≥ ' if row['bounded_by_cap'] else ''}{row['max_rate']:,.0f}"

    return cell


def _rate_p99(ns: dict[str, Any]) -> Any:
    def cell(c: str) -> str:
        at = (ns.get(c) or {}).get("at_max")
        if not at:
            return "-"
        cpu = "-" if c == "direct" else f"{at['proxy_cpu_ms_per_req']:.3f}"
        return f"{at['p99_ms']:.1f} / {cpu}"

    return cell


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.1f}x"


def _ratio_rows(sc: dict[str, Any], cols: list[str]) -> list[list[str]]:
    s100, s1k, mem, ns = sc["streams_100"], sc["streams_1000"], sc["memory"], sc["nonstream"]

    def rate(c: str) -> float | None:
        row = ns.get(c) or ns.get("sluicegate-pass") or {}
        value = row.get("max_rate")
        return None if value is None else float(value)

    def ratio_cell(get: Any) -> Any:
        return lambda c: "-" if c == "direct" else _ratio(get(c), get("nginx"))

    return [
        _per_col(
            "CPU per stream ÷ nginx's, 100 steady / 1,000 at once",
            cols,
            lambda c: (
                "-"
                if c == "direct"
                else " / ".join(
                    _ratio(d[c]["proxy_cpu_s_per_1k"], d["nginx"]["proxy_cpu_s_per_1k"])
                    for d in (s100, s1k)
                )
            ),
        ),
        _per_col(
            "RSS growth ÷ nginx's",
            cols,
            ratio_cell(lambda c: mem[c]["rss_growth_mb"] if c in mem else None),
        ),
        _per_col(
            "non-stream req/s ÷ nginx's",
            cols,
            lambda c: (
                "-"
                if c in ("direct", "floor")
                else ("≤ " if c != "nginx" and ns.get("nginx", {}).get("bounded_by_cap") else "")
                + _ratio(rate(c), rate("nginx"))
            ),
        ),
    ]


def markdown(headings: list[str], body: list[list[str]]) -> str:
    lines = ["| metric | " + " | ".join(headings) + " |", "|---" * (len(headings) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


Check = tuple[str, bool]  # the figure as text, and whether the target is met


def _over_floor(key: str, mode: str, pct: str, bound: float) -> Any:
    def check(sc: dict[str, Any]) -> Check:
        over = sc[key][mode][f"ttft_{pct}_ms"] - sc[key]["floor"][f"ttft_{pct}_ms"]
        return f"floor {over:+.2f} ms", over <= bound

    return check


def _burst_ratio(sc: dict[str, Any]) -> Check:
    s1k = sc["streams_1000"]
    added = [
        s1k[c]["ttft_p50_ms"] - s1k["direct"]["ttft_p50_ms"] for c in ("sluicegate-auto", "floor")
    ]
    ratio = added[0] / added[1] if added[1] > 0 else math.inf
    return f"+{added[0]:.0f} ms vs the floor's +{added[1]:.0f}: {ratio:.2f}x", ratio <= 1.5


def _cpu_ratio(sc: dict[str, Any]) -> Check:
    s100 = sc["streams_100"]
    ratio = s100["sluicegate-auto"]["proxy_cpu_s_per_1k"] / s100["floor"]["proxy_cpu_s_per_1k"]
    return f"{ratio:.2f}x", ratio <= 1.15


def _idle_rss(sc: dict[str, Any]) -> Check:
    rss = sc["memory"]["sluicegate-auto"]["rss_before_mb"]
    return f"{rss:.1f} MB", rss <= 50


def _growth(mode: str) -> Any:
    def check(sc: dict[str, Any]) -> Check:
        m = sc["memory"][mode]
        return f"+{m['rss_growth_mb']:.1f} MB, {m['errors']} errors", (
            m["rss_growth_mb"] <= 40 and m["errors"] == 0
        )

    return check


def _rate_ratio(sc: dict[str, Any]) -> Check:
    ours, floor = (sc["nonstream"][c]["max_rate"] for c in ("sluicegate-pass", "floor"))
    return f"{ours:,.0f} vs {floor:,.0f}: {ours / floor:.2f}x", ours >= 0.8 * floor


# Issue 18's targets (and the +0.5 ms of the one before), each a ratio or difference against
# the uvicorn+aiohttp floor measured in the same run. `auto` is the default mode.
TARGETS: tuple[tuple[str, Any], ...] = (
    (
        "added TTFT p50 ≤ floor + 0.5 ms, 100 steady (`auto`)",
        _over_floor("streams_100", "sluicegate-auto", "p50", 0.5),
    ),
    (
        "added TTFT p50 ≤ floor + 0.5 ms, 100 steady (`pass`)",
        _over_floor("streams_100", "sluicegate-pass", "p50", 0.5),
    ),
    (
        "added TTFT p50 ≤ floor + 5 ms, 200 steady (`auto`)",
        _over_floor("streams_200", "sluicegate-auto", "p50", 5),
    ),
    (
        "added TTFT p99 ≤ floor + 15 ms, 200 steady (`auto`)",
        _over_floor("streams_200", "sluicegate-auto", "p99", 15),
    ),
    ("1,000 opened at once: added TTFT p50 ≤ 1.5x the floor's (`auto`)", _burst_ratio),
    ("CPU per stream ≤ 1.15x the floor's, 100 steady (`auto`)", _cpu_ratio),
    ("idle RSS ≤ 50 MB, a config that needs no estimates (`auto`)", _idle_rss),
    ("RSS growth ≤ 40 MB per 1,000 open streams (`auto`)", _growth("sluicegate-auto")),
    ("RSS growth ≤ 40 MB per 1,000 open streams (`pass`)", _growth("sluicegate-pass")),
    ("non-stream req/s per worker ≥ 0.8x the floor's (`pass`)", _rate_ratio),
)


def targets(result: dict[str, Any], previous: dict[str, Any] | None = None) -> list[list[str]]:
    """Each target: this run's figure, met or not, and the previous run's figure."""
    out = []
    for name, check in TARGETS:
        text, ok = _figure(check, result)
        before = "-" if previous is None else _figure(check, previous)[0]
        out.append([name, text, "-" if ok is None else "yes" if ok else "**no**", before])
    return out


def _figure(check: Any, result: dict[str, Any]) -> tuple[str, bool | None]:
    try:
        text, ok = check(result["scenarios"])
    except (KeyError, ZeroDivisionError):  # a run from before that column or scenario
        return "not measured", None
    return text, bool(ok)


def previous(path: Path) -> dict[str, Any] | None:
    """The last run's JSON, read before this run's replaces it."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def table(result: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    headings, body = rows(result)
    goal = ["| target | measured | met | previous run |", "|---|---|---|---|"]
    goal += ["| " + " | ".join(r) + " |" for r in targets(result, before)]
    return markdown(headings, body) + "\n\n" + "\n".join(goal) + "\n"


# Sections of RESULTS.md written by other benchmarks (bench/fleet_state.py, `run.py --https`):
# kept, at the end, from the first of them on.
HTTPS_SECTION = "## HTTPS upstreams (issue 21)"
KEPT = ("\n## Fleet state on Redis", "\n" + HTTPS_SECTION)


def write_results(result: dict[str, Any], table_md: str, path: Path) -> None:
    from notes import results_markdown  # noqa: PLC0415  # only needed here

    old = path.read_text() if path.exists() else ""
    starts = [old.index(heading) for heading in KEPT if heading in old]
    kept = old[min(starts) :] if starts else ""
    path.write_text(results_markdown(result, table_md) + kept)
