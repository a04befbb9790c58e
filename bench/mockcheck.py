"""Is the mock upstream cheap enough? Its CPU per stream, read from /proc, against the
proxy's at the same load; and do the lean mock's bytes equal `sluicegate mock-upstream`'s?

The load generator and the mock share one core, so every microsecond the mock spends is
taken from the measurement of the direct path (and, at 1,000 streams, of every path).
"""

from __future__ import annotations

from typing import Any

from loadgen import Pool, chat_request
from procs import Proc
from quiet import Machine
from scenarios import STREAM, Shape, Target, streams

INCLUDE_USAGE = {"stream_options": {"include_usage": True}}


async def body_of(port: int, model: str, extra: dict[str, Any] | None) -> bytes:
    pool = Pool("127.0.0.1", port)
    try:
        request = chat_request(
            "127.0.0.1", port, model, stream=True, mock=STREAM, seed=7, extra=extra
        )
        return (await pool.fetch(request, 10.0)).body
    finally:
        pool.close()


async def same_bytes(ports: dict[str, int], proxy_port: int) -> dict[str, bool]:
    """SSE bodies for one seed, without and with include_usage: every mock and the
    proxy in `pass` mode must answer the same bytes as `sluicegate mock-upstream`."""
    out = {}
    for label, extra in (("plain", None), ("include_usage", INCLUDE_USAGE)):
        reference = await body_of(ports["sluicegate"], "mock-chat", extra)
        out[f"lean_mock_{label}"] = await body_of(ports["lean"], "mock-chat", extra) == reference
        out[f"proxy_pass_{label}"] = await body_of(proxy_port, "bench", extra) == reference
    return out


async def check_mocks(
    mocks: dict[str, tuple[Proc, int]], proxy: Proc, proxy_port: int, rounds: int, machine: Machine
) -> dict[str, Any]:
    """Bursts of 100 streams straight to each mock, then through the proxy to ours."""
    out: dict[str, Any] = {"concurrency": 100, "rounds": rounds}
    shape = Shape("burst", 100)
    for kind, (proc, port) in mocks.items():
        direct = Target(f"direct-{kind}", port, "mock-chat", None)
        result = await streams([direct], proc, shape, rounds, machine)
        out[f"{kind}_mock_cpu_s_per_1k"] = result[direct.name]["mock_cpu_s_per_1k"]
        out[f"{kind}_client_cpu_s_per_1k"] = result[direct.name]["client_cpu_s_per_1k"]
        out[f"{kind}_direct_ttft_p50_ms"] = result[direct.name]["ttft_p50_ms"]
        direct.pool.close()
    ours, _ = mocks["sluicegate"]
    through = Target("through-proxy", proxy_port, "bench", proxy)
    result = (await streams([through], ours, shape, rounds, machine))[through.name]
    through.pool.close()
    out["proxy_cpu_s_per_1k"] = result["proxy_cpu_s_per_1k"]
    out["sluicegate_mock_cpu_s_per_1k_via_proxy"] = result["mock_cpu_s_per_1k"]
    share = out["sluicegate_mock_cpu_s_per_1k"] / max(1e-9, out["proxy_cpu_s_per_1k"])
    out["sluicegate_mock_share_of_proxy"] = share
    out["same_bytes"] = await same_bytes({k: port for k, (_, port) in mocks.items()}, proxy_port)
    return out
