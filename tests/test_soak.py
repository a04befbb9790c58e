"""The soak: two minutes of mixed traffic with faults through a real proxy (bench/soak.py as a
subprocess), and the parts that decide its verdict on made-up runs, so that a lost request, a
wrong byte, growth or a leftover connection is shown to fail it. tests/README.md shows the
request mix (checked against bench/soak_traffic.py)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from proxy.errors import error_body
from proxy.mock.content import completion_body, injected_error_body
from proxy.sse import completion_to_sse
from tests.helpers import ROOT, wait_for


def _bench(name: str) -> ModuleType:
    """A bench/ module: they import one another by bare name, as scripts do."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    return importlib.import_module(name)


procs, traffic, verdict, report = map(
    _bench, ("procs", "soak_traffic", "soak_verdict", "soak_report")
)
MB = verdict.MB


# --- the soak itself ------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_two_minutes_of_faulty_traffic_lose_no_request_and_leave_nothing_open(
    tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/soak.py", "--minutes", "2", "--sample-seconds", "20"]
    run = subprocess.run(
        [*cmd, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    result = json.loads(out.read_text())
    assert (result["verdict"]["passed"], result["verdict"]["failures"]) == (True, [])
    assert result["counts"].get("lost", 0) == 0
    assert len(result["samples"]) == 6
    assert [c.name for c in traffic.CASES if not result["cases"].get(c.name)] == []  # all ran
    drained = result["drained"]
    assert drained["counted"] == drained["sent"] == sum(result["counts"].values())
    assert (drained["inflight"], drained["pool"], drained["close_wait"]) == (0, 0, 0)
    assert drained["fds"] <= drained["baseline_fds"]


# --- the verdict on made-up runs --------------------------------------------------------------

LIMITS = verdict.Limits(warmup=30.0, fd_growth=50, pool_growth=50)
CLEAN = verdict.Drained(
    baseline_fds=14, fds=14, pool=0, close_wait=0, inflight=0, counted=600, sent=600, log_errors=0
)


def _samples(
    rss_mb: list[float], fds: list[int] | None = None, pool: list[int] | None = None
) -> list[Any]:
    n = len(rss_mb)
    return [
        verdict.Sample(
            at=20.0 * (i + 1),
            requests=100 * (i + 1),
            lost=0,
            errors=10 * i,
            rss=int(rss * MB),
            fds=f,
            pool=p,
            close_wait=0,
            clients=50,
            inflight=50,
        )
        for i, (rss, f, p) in enumerate(
            zip(rss_mb, fds or [115] * n, pool or [52] * n, strict=True)
        )
    ]


FLAT = [130.0, 130.9, 129.8, 131.0, 130.2, 130.6]


@pytest.mark.parametrize(
    ("rss_mb", "passes"),
    [
        pytest.param(FLAT, True, id="flat-and-noisy"),
        pytest.param([95.0, 130.0, 130.2, 130.1, 130.4, 130.3], True, id="growth-in-warm-up"),
        pytest.param([130.0, 130.0, 130.0, 147.0, 147.0, 147.0], True, id="17MB-under-20MB"),
        pytest.param([400.0, 400.0, 400.0, 431.0, 431.0, 431.0], True, id="31MB-under-10pc"),
        pytest.param([130.0, 130.0, 130.0, 170.0, 170.0, 170.0], False, id="40MB-and-31pc"),
        pytest.param([130.0, 140.0, 150.0, 160.0, 170.0, 180.0], False, id="slow-leak"),
        pytest.param([130.0, 130.0, 130.0, 130.0, 130.0, 190.0], False, id="jump-at-the-end"),
    ],
)
def test_rss_fails_only_growth_over_both_the_share_and_the_bytes(
    rss_mb: list[float], passes: bool
) -> None:
    result = verdict.judge(_samples(rss_mb), CLEAN, 0, LIMITS)
    assert result.passed is passes, result.failures
    assert [f for f in result.failures if not f.startswith("RSS grew")] == []


def test_file_descriptors_or_upstream_connections_that_keep_growing_fail() -> None:
    rising = [110, 112, 140, 170, 200, 230]
    fds = verdict.judge(_samples(FLAT, fds=rising), CLEAN, 0, LIMITS)
    assert fds.failures == ["open file descriptors grew from 126 to 215 (limit: +50)"]
    pool = verdict.judge(_samples(FLAT, pool=rising), CLEAN, 0, LIMITS)
    assert pool.failures == ["upstream connections grew from 126 to 215 (limit: +50)"]
    wobbly = verdict.judge(_samples(FLAT, fds=[110, 150, 100, 160, 105, 140]), CLEAN, 0, LIMITS)
    assert wobbly.passed, wobbly.failures


def test_one_lost_request_fails_a_flat_run() -> None:
    assert verdict.judge(_samples(FLAT), CLEAN, 0, LIMITS).passed
    lost = verdict.judge(_samples(FLAT), CLEAN, 1, LIMITS)
    assert lost.failures == ["1 request(s) lost or corrupted"]


@pytest.mark.parametrize(
    ("left", "says"),
    [
        ({"inflight": 1}, "1 request(s) still in flight"),
        ({"pool": 2}, "2 upstream connection(s) still open"),
        ({"close_wait": 1}, "1 socket(s) in CLOSE_WAIT"),
        ({"fds": 15}, "15 file descriptors after the drain, 14 before"),
        ({"counted": 599}, "the proxy counted 599 requests, the clients sent 600"),
        ({"log_errors": 1}, "1 error-level line(s)"),
    ],
)
def test_anything_left_after_the_drain_fails(left: dict[str, Any], says: str) -> None:
    result = verdict.judge(_samples(FLAT), dataclasses.replace(CLEAN, **left), 0, LIMITS)
    assert len(result.failures) == 1
    assert result.failures[0].startswith(says)


def test_too_few_samples_after_the_warm_up_is_not_a_pass() -> None:
    result = verdict.judge(_samples([130.0, 130.0, 130.0]), CLEAN, 0, LIMITS)
    assert result.failures == [
        "2 sample(s) after the 30 s warm-up: growth needs 3; run longer or sample more often"
    ]


def test_windows_are_medians_of_the_first_and_last_third() -> None:
    assert verdict.windows([1, 2, 3, 4, 5, 6, 7]) == (2, 6)
    assert verdict.windows([5, 1, 9]) == (5, 9)


# --- what counts as lost ----------------------------------------------------------------------

FAULTY, BACKUP = traffic.FAULTY, traffic.BACKUP


def _request(case: str, tokens: int = 8) -> Any:
    found = next(c for c in traffic.CASES if c.name == case)
    return traffic.Request(found, 42, tokens, [{"role": "user", "content": "双十一?"}])


def _got(body: bytes, status: int = 200, complete: bool = True, **headers: str) -> Any:
    return traffic.Got(status, headers, body, complete)


def _error_event(code: str) -> bytes:
    return b"data: " + error_body("cut", "upstream_error", code=code) + b"\n\n"


def test_the_exact_answer_of_either_upstream_is_answered() -> None:
    for case in ("stream", "stream_with_usage", "plain"):
        request = _request(case)
        for model in (FAULTY, BACKUP):
            assert traffic.check(request, _got(request.answer(model))) == ("answered", None)
    request = _request("keepalives_then_answer")
    comments = b": keep-alive\n\n" * 3
    assert traffic.check(request, _got(comments + request.answer(FAULTY))) == ("answered", None)


def _lost(request: Any, got: Any) -> str:
    kind, why = traffic.check(request, got)
    assert kind == "lost"
    assert why
    return str(why)


def test_a_wrong_byte_a_truncation_or_the_wrong_upstream_is_lost() -> None:
    request = _request("stream")
    answer = request.answer(FAULTY)
    corrupt = answer[:300] + bytes([answer[300] ^ 1]) + answer[301:]
    assert "differ from byte" in _lost(request, _got(corrupt))
    assert "differ from byte" in _lost(request, _got(answer.removesuffix(b"data: [DONE]\n\n")))
    assert _lost(request, _got(answer, status=500))
    assert _lost(request, _got(request.answer(FAULTY)[:-1] + b"!"))
    fell_back = _request("fallback_on_500")  # the faulty upstream must not have answered
    assert _lost(fell_back, _got(fell_back.answer(FAULTY)))
    assert traffic.check(fell_back, _got(fell_back.answer(BACKUP))) == ("answered", None)
    keepalives = _request("keepalives_then_answer")  # its comments were not relayed
    assert _lost(keepalives, _got(keepalives.answer(FAULTY)))


def test_a_stream_rebuilt_from_json_is_checked_by_its_text() -> None:
    request = _request("json_for_stream")
    completion = completion_body(42, FAULTY, 8, "stop", 7)
    rebuilt = completion_to_sse(completion, with_usage=False)
    assert rebuilt is not None
    assert traffic.check(request, _got(rebuilt)) == ("answered", None)
    other = completion_to_sse(completion_body(43, FAULTY, 8, "stop", 7), with_usage=False)
    assert "text" in _lost(request, _got(other or b""))
    assert _lost(request, _got(b"<html>502</html>"))  # unreadable is lost, not a crash


def test_a_cut_stream_must_end_in_one_error_event() -> None:
    request = _request("cut_by_reset_solo", tokens=10)
    head = request.cut(3)
    error = _error_event("upstream_protocol_error")
    assert traffic.check(request, _got(head + error)) == ("cut", None)
    assert "not one error event" in _lost(request, _got(head))  # a silent truncation
    assert _lost(request, _got(head + error + b"data: [DONE]\n\n"))
    assert _lost(request, _got(request.cut(2) + error))
    assert _lost(request, _got(head + _error_event("upstream_timeout")))
    maybe_backup = _request("cut_by_reset", tokens=10)
    assert traffic.check(maybe_backup, _got(maybe_backup.answer(BACKUP))) == ("answered", None)
    assert _lost(maybe_backup, _got(maybe_backup.answer(BACKUP)[:-20]))


def test_errors_must_be_the_upstreams_own_or_openai_shaped() -> None:
    relayed = _request("relay_429_retry_after")
    body = injected_error_body(429)
    assert traffic.check(relayed, _got(body, 429, **{"retry-after": "1"})) == ("error", None)
    assert _lost(relayed, _got(body, 429))  # Retry-After dropped
    assert _lost(relayed, _got(body, 502, **{"retry-after": "1"}))
    refused = _request("reset_before_headers")
    ours = error_body("closed", "upstream_error", code="upstream_protocol_error")
    assert traffic.check(refused, _got(ours, 502)) == ("error", None)
    assert _lost(refused, _got(b"Bad Gateway", 502))
    assert _lost(refused, _got(orjson.dumps({"error": {"code": "upstream_protocol_error"}}), 502))


def test_a_client_that_leaves_must_have_got_the_answers_beginning() -> None:
    request = _request("client_abort", tokens=200)
    answer = request.answer(BACKUP)
    assert traffic.check(request, _got(answer[:900], complete=False)) == ("aborted", None)
    assert _lost(request, _got(answer[:899] + b"#", complete=False))


def test_the_readme_lists_the_soak_mix() -> None:
    readme = (ROOT / "tests" / "README.md").read_text()
    assert [line for line in report.mix_table() if line not in readme] == []


# --- reading the proxy's sockets from /proc ---------------------------------------------------


def test_tcp_sockets_are_this_process_own_with_their_state() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            mine = client.getsockname()[1]
            found = procs.tcp_sockets(os.getpid())
            assert procs.TcpSocket(port, 0, "listen") in found
            assert procs.TcpSocket(mine, port, "established") in found
            assert procs.TcpSocket(port, mine, "established") in found
            accepted.close()  # the peer closed; this side has not yet
            closing = procs.TcpSocket(mine, port, "close_wait")
            assert wait_for(lambda: closing in procs.tcp_sockets(os.getpid()))
    before = procs.open_fds(os.getpid())
    with socket.socket():
        assert procs.open_fds(os.getpid()) == before + 1
