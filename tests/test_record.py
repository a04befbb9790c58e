"""Observers: a failing one never breaks a request and is always counted, by its name; and,
through a real proxy on loopback, that count is `sluicegate_observer_errors_total{observer}`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import _guarded, create_app
from proxy.config import parse_config
from proxy.observe.metrics import Metrics
from proxy.record import Observers, RequestRecord
from proxy.serving import RunningServer


def _boom(_: object) -> None:
    raise RuntimeError("this observer always fails")


@pytest.mark.parametrize(
    ("start", "finish", "failed", "heard"),
    [
        ((), (), [], []),
        ((("a", _boom),), (), ["a"], []),
        ((), (("a", _boom), ("b", _boom)), ["a", "b"], []),
        ((("a", _boom),), (("b", _boom),), ["a", "b"], []),
        # a failure does not stop the observers after it
        ((("a", _boom), ("b", "hear")), (("c", _boom), ("d", "hear")), ["a", "c"], ["b", "d"]),
    ],
)
def test_a_failing_observer_is_handed_to_failed_by_name_and_the_rest_still_hear(
    start: tuple[tuple[str, object], ...],
    finish: tuple[tuple[str, object], ...],
    failed: list[str],
    heard: list[str],
) -> None:
    got_failed: list[str] = []
    got_heard: list[str] = []

    def resolve(name: str, observer: object) -> object:
        return (lambda _: got_heard.append(name)) if observer == "hear" else observer

    observers = Observers(
        on_start=tuple((n, resolve(n, o)) for n, o in start),
        on_finish=tuple((n, resolve(n, o)) for n, o in finish),
        failed=got_failed.append,
    )
    observers.started("support-bot")  # never raises
    observers.finished(RequestRecord("r1", status=200))
    assert got_failed == failed
    assert got_heard == heard


def test_without_a_counter_failures_are_still_contained() -> None:
    Observers(on_start=(("a", _boom),), on_finish=(("b", _boom),)).started("support-bot")
    Observers(on_finish=(("b", _boom),)).finished(RequestRecord("r1"))


def _observer_errors(metrics_text: str) -> dict[str, float]:
    return {
        sample.labels["observer"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "sluicegate_observer_errors_total"
    }


def test_an_embedders_failing_observer_is_counted_and_the_answer_unharmed(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""\
upstreams:
  mock: {{base_url: '{mock_server.url}/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
""")
    handed: list[RequestRecord] = []

    def failing(record: RequestRecord) -> None:
        handed.append(record)
        raise RuntimeError("an embedder's observer fails")

    app = create_app(path, env={}, watch_interval=None, observers=(failing,))
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    with RunningServer(app) as proxy, httpx.Client(base_url=proxy.url, timeout=20) as http:
        assert _observer_errors(http.get("/metrics").text) == {
            "access_log": 0,
            "extra": 0,
            "metrics": 0,
        }
        for stream in (False, True):
            answer = http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert answer.status_code == 200
            assert ("data: [DONE]" in answer.text) is stream
        errors = _observer_errors(http.get("/metrics").text)
    assert [r.status for r in handed] == [200, 200]
    assert errors == {"access_log": 0, "extra": 2, "metrics": 0}


def test_a_failing_upstream_hook_is_contained_and_counted() -> None:
    """Cooldown, first-token and ejection hooks run inside an attempt: one that fails must
    neither break the attempt nor go unseen."""
    config = parse_config(
        "upstreams: {up: {base_url: 'http://up'}}\n"
        "routes: [{model: r, targets: [{upstream: up, model: m}]}]\n",
        "routes.yaml",
        {},
    )
    meter = Metrics(config, registry=CollectorRegistry())

    def broken(*_: object) -> None:
        raise RuntimeError("a metrics bug")

    hook = _guarded(broken, meter)
    hook("up", True)  # returns: the failure is contained
    hook("up", "m", 0.2)
    assert _observer_errors(meter.render()[0].decode())["metrics"] == 2
