"""The metrics observer: constructed records in, the parsed exposition out, exact values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from proxy.config import parse_config
from proxy.metering.cost import cost_usd
from proxy.observe.metrics import (
    NONE,
    OTHER,
    UNKNOWN,
    Metrics,
    mark_process_dead,
)
from proxy.observe.metrics_server import prepare_multiprocess_dir
from proxy.record import Attempt, RequestRecord, Usage
from tests.test_prometheus import CONFIG, ROUTES, require_binary  # one config for both

ROOT = Path(__file__).resolve().parent.parent

USAGE = Usage(input=476, cached_input=1024, output=180, reasoning=120)
COST = cost_usd(USAGE, CONFIG.pricing["deepseek-chat"])  # 0.000287952 USD

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


KEYED = ("sluicegate_requests_total", "sluicegate_tokens_total", "sluicegate_cost_usd_total")


def value(got: Samples, name: str, **labels: str) -> float | None:
    """The sample with exactly these labels; `key` is `_none` (no client keys) unless given."""
    if name in KEYED:
        labels.setdefault("key", NONE)
    return got.get((name, frozenset(labels.items())))


def series(got: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in got if n == name]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CONFIG)


def answered(**fields: Any) -> RequestRecord:
    """A streamed support-bot request answered by its first target."""
    base: dict[str, Any] = {
        "request_id": "req-1",
        "status": 200,
        "route": "support-bot",
        "upstream": "deepseek",
        "model": "deepseek-chat",
        "stream": True,
        "duration_s": 2.5,
        "ttft_s": 0.12,
        "usage": USAGE,
        "cost_usd": COST,
        "attempts": [Attempt("deepseek", "deepseek-chat", "ok", 2.4)],
    }
    return RequestRecord(**(base | fields))


SUPPORT = {"route": "support-bot", "upstream": "deepseek", "model": "deepseek-chat"}


def test_tokens_by_type_and_cost_to_the_cent(metrics: Metrics) -> None:
    for _ in range(10_000):
        metrics.request_finished(answered())
    got = samples(metrics.render()[0])
    tokens = {
        labels["type"]: value(got, "sluicegate_tokens_total", **labels)
        for labels in series(got, "sluicegate_tokens_total")
        if labels["usage_source"] == "reported" and labels["route"] == "support-bot"
    }
    assert tokens == {
        "input": 4_760_000,
        "cached_input": 10_240_000,
        "output": 1_800_000,
        "reasoning": 1_200_000,
    }
    cost = value(got, "sluicegate_cost_usd_total", **SUPPORT)
    assert cost == pytest.approx(2.87952, abs=1e-9)
    assert round(cost or 0, 2) == 2.88


def test_requests_durations_and_ttft(metrics: Metrics) -> None:
    metrics.request_finished(answered())
    metrics.request_finished(answered(stream=False, status=502, ttft_s=None, usage=None))
    got = samples(metrics.render()[0])
    requests = "sluicegate_requests_total"
    assert value(got, requests, **SUPPORT, stream="true", status="200") == 1
    assert value(got, requests, **SUPPORT, stream="false", status="502") == 1
    ttft = "sluicegate_time_to_first_token_seconds"
    assert value(got, ttft + "_count", **SUPPORT) == 1
    assert value(got, ttft + "_sum", **SUPPORT) == 0.12
    assert value(got, ttft + "_bucket", **SUPPORT, le="0.1") == 0
    assert value(got, ttft + "_bucket", **SUPPORT, le="0.15") == 1
    duration = "sluicegate_request_duration_seconds"
    assert value(got, duration + "_count", **SUPPORT, stream="false") == 1
    assert value(got, duration + "_sum", **SUPPORT, stream="true") == 2.5


def test_unpriced_tokens_are_counted_with_no_cost_and_warned_once(metrics: Metrics) -> None:
    labs = {"route": "labs", "upstream": "local", "model": "free-model"}
    with capture_logs() as logs:
        for _ in range(3):
            metrics.request_finished(answered(**labs, cost_usd=None, usage=Usage(10, 0, 5, 1)))
    got = samples(metrics.render()[0])
    assert (
        value(got, "sluicegate_unpriced_tokens_total", upstream="local", model="free-model") == 48
    )
    assert value(got, "sluicegate_cost_usd_total", **labs) is None
    assert [(e["event"], e["model"]) for e in logs] == [("unpriced_model", "free-model")]


def test_attempts_fallbacks_and_stream_errors(metrics: Metrics) -> None:
    metrics.request_finished(
        answered(
            upstream="gemini",
            model="gemini-2.0-flash",
            attempts=[
                Attempt("deepseek", "deepseek-chat", "first_token_timeout", 2.0),
                Attempt("gemini", "gemini-2.0-flash", "ok", 1.1),
            ],
            fallback_reason="first_token_timeout",
            stream_error="upstream_reset",
        )
    )
    got = samples(metrics.render()[0])
    attempts = "sluicegate_upstream_attempts_total"
    assert value(got, attempts, upstream="deepseek", outcome="first_token_timeout") == 1
    assert value(got, attempts, upstream="gemini", outcome="ok") == 1
    assert series(got, "sluicegate_fallbacks_total") == [
        {
            "route": "support-bot",
            "from_upstream": "deepseek",
            "to_upstream": "gemini",
            "reason": "first_token_timeout",
        }
    ]
    assert value(got, "sluicegate_fallbacks_total", **series(got, "sluicegate_fallbacks_total")[0])
    stream_errors = "sluicegate_stream_errors_total"
    assert value(
        got, stream_errors, route="support-bot", upstream="gemini", reason="upstream_reset"
    )


def test_inflight_goes_up_and_down(metrics: Metrics) -> None:
    inflight = "sluicegate_inflight_requests"
    for _ in range(3):
        metrics.request_started("support-bot")
    metrics.request_started(None)  # never routed: not counted in flight
    assert value(samples(metrics.render()[0]), inflight, route="support-bot") == 3
    metrics.request_finished(answered())
    metrics.request_finished(RequestRecord("bad-json", status=400))
    got = samples(metrics.render()[0])
    assert value(got, inflight, route="support-bot") == 2
    assert value(got, inflight, route="labs") == 0
    assert value(got, inflight, route=UNKNOWN) is None


def test_unrouted_requests_add_no_series(metrics: Metrics) -> None:
    metrics.request_finished(RequestRecord("r0", status=404, stream=True, error="model_not_found"))
    before = set(samples(metrics.render()[0]))
    for i in range(10_000):
        # The model the client named never reaches the record: route stays None.
        metrics.request_finished(RequestRecord(f"r{i}", status=404, stream=True, duration_s=0.001))
    got = samples(metrics.render()[0])
    assert set(got) == before
    unrouted = {"route": UNKNOWN, "upstream": NONE, "model": NONE}
    assert (
        value(got, "sluicegate_requests_total", **unrouted, stream="true", status="404") == 10_001
    )


def test_values_outside_the_config_collapse_to_other(metrics: Metrics) -> None:
    metrics.request_started("made-up-route")
    metrics.request_finished(
        answered(
            route="made-up-route",
            upstream="made-up-upstream",
            model="made-up-model",
            status=1234,
            attempts=[Attempt("made-up-upstream", "m", cast(Any, "exploded"))],
            usage=Usage(1, 0, 1, 0, source=cast(Any, "guessed")),
        )
    )
    metrics.set_cooldown("made-up-upstream", True)
    metrics.observer_failed("made-up-observer")
    got = samples(metrics.render()[0])
    other = {"route": OTHER, "upstream": OTHER, "model": OTHER}
    assert value(got, "sluicegate_requests_total", **other, stream="true", status=OTHER) == 1
    assert value(got, "sluicegate_inflight_requests", route=OTHER) == 0
    assert value(got, "sluicegate_upstream_attempts_total", upstream=OTHER, outcome=OTHER) == 1
    assert value(got, "sluicegate_tokens_total", **other, type="input", usage_source=OTHER) == 1
    assert value(got, "sluicegate_upstream_cooldown", upstream=OTHER) == 1
    assert value(got, "sluicegate_observer_errors_total", observer=OTHER) == 1


def test_a_routed_request_that_reached_no_upstream(metrics: Metrics) -> None:
    metrics.request_finished(RequestRecord("r", 503, route="support-bot", stream=False))
    got = samples(metrics.render()[0])
    labels = {"route": "support-bot", "upstream": NONE, "model": NONE}
    assert value(got, "sluicegate_requests_total", **labels, stream="false", status="503") == 1


def test_reason_words_are_bounded(metrics: Metrics) -> None:
    for i in range(100):
        metrics.request_finished(answered(stream_error=f"reason_{i}"))
    metrics.request_finished(answered(stream_error="Not A Word!"))
    got = samples(metrics.render()[0])
    reasons = [labels["reason"] for labels in series(got, "sluicegate_stream_errors_total")]
    assert sorted(reasons) == sorted([OTHER] + [f"reason_{i}" for i in range(32)])
    stream_errors = "sluicegate_stream_errors_total"
    assert value(got, stream_errors, route="support-bot", upstream="deepseek", reason=OTHER) == 69


def test_a_failing_observation_is_counted_never_raised(metrics: Metrics) -> None:
    broken = answered(usage=cast(Any, "not a usage"))
    with capture_logs() as logs:
        metrics.request_finished(broken)
        metrics.request_finished(broken)
    got = samples(metrics.render()[0])
    assert value(got, "sluicegate_observer_errors_total", observer="metrics") == 2
    assert [e["event"] for e in logs] == ["metrics_observer_failed"]


def test_reloads_cooldowns_and_series_that_start_at_zero(metrics: Metrics) -> None:
    got = samples(metrics.render()[0])
    assert value(got, "sluicegate_config_reloads_total", result="error") == 0
    assert value(got, "sluicegate_upstream_cooldown", upstream="gemini") == 0
    assert value(got, "sluicegate_unpriced_tokens_total", upstream="local", model="free-model") == 0
    newer = parse_config(ROUTES.replace("model: labs", "model: labs-v2"), "routes.yaml", {})
    metrics.config_reloaded(ok=False)
    metrics.config_reloaded(ok=True, config=newer)
    metrics.set_cooldown("deepseek", True)
    metrics.set_cooldown("gemini", True)
    metrics.set_cooldown("gemini", False)
    metrics.request_started("labs-v2")
    got = samples(metrics.render()[0])
    assert value(got, "sluicegate_config_reloads_total", result="ok") == 1
    assert value(got, "sluicegate_config_reloads_total", result="error") == 1
    assert value(got, "sluicegate_upstream_cooldown", upstream="deepseek") == 1
    assert value(got, "sluicegate_upstream_cooldown", upstream="gemini") == 0
    assert value(got, "sluicegate_inflight_requests", route="labs-v2") == 1


def test_kept_series_never_mix_routes_upstreams_or_models(metrics: Metrics) -> None:
    """Children are kept by label values (`Series`): each route, upstream and model still
    gets its own series, interleaved, and a route added by a reload gets a new one."""
    labs = {"route": "labs", "upstream": "local", "model": "free-model"}
    fallback = {**SUPPORT, "upstream": "gemini", "model": "gemini-2.0-flash"}
    newer = parse_config(ROUTES.replace("model: labs", "model: labs-v2"), "routes.yaml", {})
    for _ in range(3):
        metrics.request_finished(answered())
        metrics.request_finished(answered(**labs, duration_s=1.0, usage=None, cost_usd=None))
    metrics.request_finished(answered(**fallback, duration_s=4.0))
    metrics.config_reloaded(ok=True, config=newer)
    metrics.request_finished(answered(**labs | {"route": "labs-v2"}, duration_s=8.0, usage=None))
    got = samples(metrics.render()[0])
    requests, duration = "sluicegate_requests_total", "sluicegate_request_duration_seconds_sum"
    ok = {"stream": "true", "status": "200"}
    assert value(got, requests, **SUPPORT, **ok) == 3
    assert value(got, requests, **labs, **ok) == 3
    assert value(got, requests, **fallback, **ok) == 1
    assert value(got, requests, **labs | {"route": "labs-v2"}, **ok) == 1
    assert value(got, duration, **SUPPORT, stream="true") == 7.5
    assert value(got, duration, **labs, stream="true") == 3.0
    assert value(got, duration, **fallback, stream="true") == 4.0
    assert value(got, duration, **labs | {"route": "labs-v2"}, stream="true") == 8.0
    assert not [s for s in series(got, requests) if OTHER in s.values()]
    tokens = "sluicegate_tokens_total"
    output = {"type": "output", "usage_source": "reported"}
    assert value(got, tokens, **SUPPORT, **output) == 3 * USAGE.output
    assert value(got, tokens, **fallback, **output) == USAGE.output


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(CONFIG), Metrics(CONFIG, CollectorRegistry())
    first.request_finished(answered())
    got = samples(second.render()[0])
    assert value(got, "sluicegate_requests_total", **SUPPORT, stream="true", status="200") is None
    assert (
        value(
            samples(first.render()[0]),
            "sluicegate_requests_total",
            **SUPPORT,
            stream="true",
            status="200",
        )
        == 1
    )


def test_promtool_accepts_the_exposition(metrics: Metrics, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    metrics.request_started("support-bot")
    metrics.request_finished(answered(fallback_reason="status_5xx", stream_error="reset"))
    metrics.request_finished(RequestRecord("r", status=404))
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""  # no lint warnings either


# --- several worker processes -----------------------------------------------------------

WORKER = """
import os, sys
from proxy.config import parse_config
from proxy.observe.metrics import Metrics
from proxy.record import Attempt, RequestRecord, Usage
metrics = Metrics(parse_config({routes!r}, "routes.yaml", {{}}))
requests, inflight, cooldown = (int(a) for a in sys.argv[1:])
for i in range(requests + inflight):
    metrics.request_started("support-bot")
for i in range(requests):
    metrics.request_finished(RequestRecord(
        f"r{{i}}", status=200, route="support-bot", upstream="deepseek", model="deepseek-chat",
        stream=True, duration_s=1.0, ttft_s=0.2, usage=Usage(100, 10, 20, 0), cost_usd=0.5,
        attempts=[Attempt("deepseek", "deepseek-chat", "ok")],
    ))
metrics.set_cooldown("deepseek", bool(cooldown))
print(os.getpid())
"""

RENDER = """
import sys
from proxy.observe.metrics import Metrics, mark_process_dead
from proxy.config import parse_config
for pid in sys.argv[1:]:
    mark_process_dead(int(pid))
sys.stdout.buffer.write(Metrics(parse_config({routes!r}, "routes.yaml", {{}})).render()[0])
"""


@pytest.fixture
def multiproc_env(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    return os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(directory)}


def _python(code: str, env: dict[str, str], *args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code).format(routes=ROUTES), *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen[bytes]) -> bytes:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    return out


def test_render_adds_up_every_worker(multiproc_env: dict[str, str]) -> None:
    # Two real worker processes at once: 3 and 5 requests, 2 and 1 still in flight.
    workers = [_python(WORKER, multiproc_env, 3, 2, 1), _python(WORKER, multiproc_env, 5, 1, 0)]
    first_pid, _ = (int(_finish(w)) for w in workers)
    got = samples(_finish(_python(RENDER, multiproc_env)))
    assert value(got, "sluicegate_requests_total", **SUPPORT, stream="true", status="200") == 8
    tokens = {"usage_source": "reported", **SUPPORT}
    assert value(got, "sluicegate_tokens_total", **tokens, type="input") == 800
    assert value(got, "sluicegate_cost_usd_total", **SUPPORT) == 4.0
    assert value(got, "sluicegate_time_to_first_token_seconds_count", **SUPPORT) == 8
    assert value(got, "sluicegate_upstream_attempts_total", upstream="deepseek", outcome="ok") == 8
    assert value(got, "sluicegate_inflight_requests", route="support-bot") == 3  # livesum
    assert value(got, "sluicegate_upstream_cooldown", upstream="deepseek") == 1  # livemax

    # The first worker exits for good: its live gauges stop counting, its counters stay.
    got = samples(_finish(_python(RENDER, multiproc_env, first_pid)))
    assert value(got, "sluicegate_inflight_requests", route="support-bot") == 1
    assert value(got, "sluicegate_upstream_cooldown", upstream="deepseek") == 0
    assert value(got, "sluicegate_requests_total", **SUPPORT, stream="true", status="200") == 8


def test_multiprocess_dir_set_too_late_is_refused(multiproc_env: dict[str, str]) -> None:
    late = """
    import os
    import prometheus_client
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ.pop("LATE_DIR")
    from proxy.observe.metrics import Metrics
    from proxy.config import parse_config
    try:
        Metrics(parse_config({routes!r}, "routes.yaml", {{}}))
    except RuntimeError as exc:
        print(exc)
    """
    env = dict(multiproc_env)
    env["LATE_DIR"] = env.pop("PROMETHEUS_MULTIPROC_DIR")
    out = _finish(_python(late, env)).decode()
    assert out.strip() == "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client loaded"


def test_prepare_multiprocess_dir_makes_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")  # and restored to unset afterwards
    made = prepare_multiprocess_dir()
    assert made is not None
    try:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == made
        assert os.listdir(made) == []
    finally:
        os.rmdir(made)


def test_prepare_multiprocess_dir_empties_the_operators(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("kept")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert prepare_multiprocess_dir() is None  # not ours to remove at exit
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_mark_process_dead_without_multiprocess_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker's files are left alone while this process has no multiprocess dir; with the
    dir set, the same call takes the worker's live gauges out (so there was work to skip)."""
    names = ["counter_4242.db", "gauge_livesum_4242.db", "gauge_livemax_4242.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"worker 4242")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    mark_process_dead(4242)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mark_process_dead(4242)
    assert [p.name for p in tmp_path.iterdir()] == ["counter_4242.db"]
