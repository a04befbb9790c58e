"""A py-spy CPU profile of each sluicegate process during the 100-stream scenario, and its
summary: self time per function, self time per package, inclusive time of the hot path.

py-spy samples Python stacks only: time spent in C under a Python frame (orjson, httptools,
a socket write) counts as that frame's self time; a stack that ends in the event loop's
`run` is uvloop's own C code (polling, socket I/O, callbacks) with no Python frame above.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from procs import pin
from quiet import Machine
from scenarios import STREAM, Shape, Target, steady

RATE = 200  # samples per second
TOP = 15
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
_PREFIXES = (r".*/site-packages/", r".*/lib/python3\.\d+/", r".*/work/main/", r".*/\w+/main/")
LOOP_FRAMES = ("Runner.run", "run_until_complete", "run_forever")


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def short(frame: str) -> str:
    """`func (path:line)` → `func (package/module.py)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for prefix in _PREFIXES:
        path = re.sub("^" + prefix, "", path)
    return f"{match['func']} ({path})"


def package(frame: str) -> str:
    match = _FRAME.match(frame)
    path = match["file"] if match else ""
    if match and match["func"] in LOOP_FRAMES:
        return "event loop (uvloop C: poll, socket I/O, callbacks)"
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/proxy/" in path:
        return "proxy (sluicegate)"
    if path.endswith("floor_relay.py"):
        return "floor relay (bench/floor_relay.py)"
    if "/asyncio/" in path:
        return "asyncio (stdlib)"
    return "stdlib, other"


def summarize(folded: Path) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    own: Counter[str] = Counter()  # self time of the relay's own code (sluicegate's or the floor's)
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        self_time[short(frames[-1])] += n
        packages[package(frames[-1])] += n
        if package(frames[-1]).startswith(("proxy", "floor")):
            own[short(frames[-1])] += n
        loop = [i for i, f in enumerate(frames) if f.split(" (")[0] in LOOP_FRAMES]
        for name in {short(f) for f in frames[loop[-1] + 1 if loop else 0 :]}:
            inclusive[name] += n

    def share(counter: Counter[str], k: int) -> list[dict[str, Any]]:
        rows = counter.most_common(k)
        return [{"name": n, "samples": c, "percent": 100 * c / max(1, total)} for n, c in rows]

    return {
        "samples": total,
        "self": share(self_time, TOP),
        "packages": share(packages, 12),
        "inclusive": share(inclusive, TOP),
        "own": share(own, TOP),
    }


def shorten_file(folded: Path) -> None:
    """Rewrite the folded stacks with short paths (a smaller file, same stacks)."""
    lines = []
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        lines.append(";".join(short(f) for f in stack.split(";")) + " " + count)
    folded.write_text("\n".join(lines) + "\n")


async def profile_one(
    binary: str, target: Target, seconds: float, out: Path, machine: Machine
) -> dict[str, Any]:
    assert target.proc is not None
    await machine.wait_quiet(20.0)
    mark = machine.mark()
    argv = ["record", "--pid", str(target.proc.pid), "--duration", f"{seconds:g}", "-o", str(out)]
    argv += ["--rate", str(RATE), "--format", "raw", "--nonblocking", "--full-filenames"]
    spy = await asyncio.create_subprocess_exec(
        binary, *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    pin([spy.pid], 0)
    cpu0, start = target.cpu(), time.monotonic()
    shape = Shape("steady", 100, seconds=seconds)
    try:
        _, streams, _ = await steady(target.pool, target.request(STREAM), shape, 30.0)
    finally:
        if spy.returncode is None:
            await asyncio.sleep(1.0)  # py-spy writes its file when its duration ends
        if spy.returncode is None:
            spy.terminate()
        _, err = await asyncio.wait_for(spy.communicate(), 30)
    cpu = target.cpu() - cpu0
    return {
        "foreign_cpu_s": machine.foreign(mark)[0],
        "streams": streams,
        "seconds": round(time.monotonic() - start, 1),
        "proxy_cpu_s_per_1k": cpu.total / max(1, streams) * 1e3,
        **finish(out, err),
    }


def finish(out: Path, err: bytes) -> dict[str, Any]:
    if not out.exists():
        return {"error": err.decode(errors="replace")[-2000:]}
    summary = summarize(out)
    shorten_file(out)
    return {"folded": str(out.relative_to(out.parent.parent)), **summary}


async def record(
    targets: list[Target], seconds: float, bench_dir: Path, machine: Machine
) -> dict[str, Any]:
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    out_dir = bench_dir / "profiles"
    out_dir.mkdir(exist_ok=True)
    results = {}
    for target in targets:
        out = out_dir / f"{target.name}.folded"
        results[target.name] = await profile_one(binary, target, seconds, out, machine)
        await asyncio.sleep(0.5)
    return results


def _rows(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| # | function (file) | samples | % |", "|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        name = row["name"].replace("|", "\\|")
        out.append(f"| {i} | `{name}` | {row['samples']} | {row['percent']:.1f} |")
    return out


def write_summary(profile: dict[str, Any], path: Path, command: str) -> None:
    lines = [
        "# CPU profile of sluicegate on the 100-stream scenario",
        "",
        f"Made by `{command}` with py-spy ({RATE} Hz, `--nonblocking`), attached to the proxy",
        "process (pinned to core 1) while the load generator held 100 concurrent streams",
        f"({STREAM['tokens']} tokens, {STREAM['delay'] * 1e3:g} ms apart; closed loop) through it.",
        "The folded stacks are in `bench/profiles/` (flamegraph.pl or speedscope draw them).",
        "",
        "Self time is where the CPU was when sampled: C code called from a Python frame",
        "(orjson, httptools, a socket write) counts as that frame's own time; a stack that ends",
        "in the loop's `Runner.run` is uvloop's C code with no Python frame above it.",
    ]
    if isinstance(profile.get("error"), str):  # no profile at all (py-spy missing)
        profile = {"every proxy": profile}
    for name, data in profile.items():
        if "error" in data:
            lines += ["", f"## {name}", "", f"profile failed: {data['error']}"]
            continue
        lines += [
            "",
            f"## {name}",
            "",
            f"{data['samples']} samples over {data['seconds']} s, {data['streams']} streams, "
            f"{data['proxy_cpu_s_per_1k']:.2f} CPU-s per 1,000 streams while sampled "
            f"(other load on the machine meanwhile: {data['foreign_cpu_s']:.1f} CPU-s).",
            "",
            f"### Top {TOP} functions by self time",
            "",
            *_rows(data["self"]),
            "",
            "### Self time by package",
            "",
            *_rows(data["packages"]),
            "",
            f"### Top {TOP} by inclusive time (below the event loop)",
            "",
            *_rows(data["inclusive"]),
        ]
    old = path.read_text() if path.exists() else ""
    lines += against_floor(profile)
    kept = old[old.index(KEPT) :] if KEPT in old else ""  # bench/request_cost.py's section
    path.write_text("\n".join(lines) + "\n" + kept)


KEPT = "\n## The per-request path"


def _per_stream(data: dict[str, Any], samples: int) -> float:
    """µs of CPU per stream that `samples` stand for: their share of the profile's samples
    times the CPU per stream measured meanwhile (py-spy misses some busy time, evenly)."""
    return samples / max(1, data["samples"]) * data["proxy_cpu_s_per_1k"] * 1e3


def against_floor(profile: dict[str, Any]) -> list[str]:
    """sluicegate-auto beside the floor relay, in µs per stream: where the difference in CPU
    per stream (issue 18's target) goes, package by package, and sluicegate's own code."""
    ours, floor = profile.get("sluicegate-auto"), profile.get("floor")
    if not ours or not floor or "error" in ours or "error" in floor:
        return []
    by = {
        name: {r["name"]: r["samples"] for r in d["packages"]}
        for name, d in (("ours", ours), ("floor", floor))
    }
    names = sorted(set(by["ours"]) | set(by["floor"]), key=lambda n: -by["ours"].get(n, 0))
    lines = [
        "",
        "## sluicegate (`auto`) against the floor relay, CPU µs per stream",
        "",
        "Each process's samples, shared out over its CPU per stream measured while sampled: "
        f"{_per_stream(ours, ours['samples']):.0f} µs per stream against "
        f"{_per_stream(floor, floor['samples']):.0f} µs for the floor.",
        "",
        "| package | floor | sluicegate | difference |",
        "|---|---|---|---|",
    ]
    for name in names:
        a, b = (_per_stream(d, by[k].get(name, 0)) for k, d in (("floor", floor), ("ours", ours)))
        lines.append(f"| {name} | {a:.0f} | {b:.0f} | {b - a:+.0f} |")
    lines += ["", "The relay's own code by self time (µs per stream):", ""]
    lines += [
        "| function (file) | sluicegate | | function (file) | floor |",
        "|---|---|---|---|---|",
    ]
    for mine, theirs in zip(ours["own"], floor["own"] + [None] * len(ours["own"]), strict=False):
        left = f"`{mine['name']}` | {_per_stream(ours, mine['samples']):.1f}"
        right = (
            "| -"
            if theirs is None
            else f"`{theirs['name']}` | {_per_stream(floor, theirs['samples']):.1f}"
        )
        lines.append(f"| {left} | | {right} |")
    return lines
