"""The access log and the metrics observe finished requests in batches (proxy.observe.batch):
nothing is lost or reordered, a failing observer is counted per record and stops nothing,
the batch's log lines go out in one write, and a scrape or shutdown sees every request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
import structlog

from proxy.app import create_app
from proxy.observe import logs
from proxy.observe.batch import Batched
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.test_metering_e2e import scrape, total


def _records(n: int) -> list[RequestRecord]:
    return [RequestRecord(f"r{i}", status=200) for i in range(n)]


def test_a_batch_waits_for_its_time_then_hands_every_record_to_each_observer_in_order() -> None:
    seen: list[tuple[str, str]] = []
    batched = Batched(
        (
            ("a", lambda r: seen.append(("a", r.request_id))),
            ("b", lambda r: seen.append(("b", r.request_id))),
        ),
        lambda name: None,
        wait=0.02,
    )

    async def run() -> tuple[list[tuple[str, str]], int]:
        for record in _records(3):
            batched(record)
        queued = list(seen), batched.pending
        await asyncio.sleep(0.1)
        return queued

    before, pending = asyncio.run(run())
    assert (before, pending) == ([], 3)  # nothing ran on the requests' own path
    assert seen == [("a", "r0"), ("a", "r1"), ("a", "r2"), ("b", "r0"), ("b", "r1"), ("b", "r2")]
    assert batched.pending == 0


def test_a_full_batch_runs_at_once_and_a_drain_runs_what_is_queued() -> None:
    seen: list[str] = []
    batched = Batched((("a", lambda r: seen.append(r.request_id)),), lambda name: None, most=4)

    async def run() -> None:
        for record in _records(5):
            batched(record)
        assert seen == ["r0", "r1", "r2", "r3"]  # the fourth filled the batch
        batched.drain()
        assert seen == ["r0", "r1", "r2", "r3", "r4"]
        batched.drain()  # nothing left: nothing runs twice

    asyncio.run(run())
    assert seen == ["r0", "r1", "r2", "r3", "r4"]


def test_a_failing_observer_is_counted_per_record_and_stops_neither_the_others_nor_the_batch() -> (
    None
):
    failed: list[str] = []
    seen: list[str] = []

    def boom(record: RequestRecord) -> None:
        if record.request_id != "r1":
            raise RuntimeError("an observer fails")

    batched = Batched(
        (("log", boom), ("metrics", lambda r: seen.append(r.request_id))), failed.append
    )
    for record in _records(3):
        batched(record)  # no running loop: each runs at once
    assert failed == ["log", "log"]
    assert seen == ["r0", "r1", "r2"]


def test_the_lines_of_a_batch_are_written_in_one_go_and_other_lines_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []  # what reached the file: one entry per flush

    class Stream:
        def __init__(self) -> None:
            self.pending = b""

        def write(self, data: bytes) -> int:
            self.pending += data
            return len(data)

        def flush(self) -> None:
            if self.pending:
                writes.append(self.pending)
            self.pending = b""

    monkeypatch.setattr(sys, "stderr", SimpleNamespace(buffer=Stream(), isatty=lambda: False))
    try:
        logs.configure(json=True)
        log = logs.get_logger()
        log.info("alone")
        assert [orjson.loads(w)["event"] for w in writes] == ["alone"]  # flushed by itself
        with logs.lines_held():
            for n in range(3):
                log.info("held", n=n)
            assert len(writes) == 1  # nothing written while held
        assert len(writes) == 2
        lines = writes[1].splitlines()
        assert [orjson.loads(line)["n"] for line in lines] == [0, 1, 2]
    finally:
        structlog.reset_defaults()
        logs.configure(json=True)


ROUTES = """\
upstreams:
  mock: {{base_url: '{url}/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
"""


def test_a_scrape_counts_every_request_that_ended_before_it(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(url=mock_server.url))
    app = create_app(path, env={}, watch_interval=None)
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    with RunningServer(app) as proxy, httpx.Client(base_url=proxy.url, timeout=20) as http:
        for n in range(1, 4):
            assert (
                http.post("/v1/chat/completions", json={**body, "stream": n == 2}).status_code
                == 200
            )
            # at once, well inside the batch's 50 ms: the scrape drains the queue first
            assert total(scrape(proxy.url), "sluicegate_requests_total") == n


def test_shutdown_writes_the_access_log_lines_still_queued(tmp_path: Path) -> None:
    """A process that serves a few requests and stops long before their batch was due still
    logs each one."""
    script = tmp_path / "serve.py"
    script.write_text(f"""\
import httpx
from proxy.app import create_app
from proxy.mock.upstream import MockUpstream
from proxy.observe import batch
from proxy.observe.logs import configure
from proxy.serving import RunningServer

batch.BATCH_SECONDS = 600
configure(json=True)
with RunningServer(MockUpstream()) as mock:
    (routes := __import__("pathlib").Path({str(tmp_path)!r}) / "routes.yaml").write_text(
        {ROUTES!r}.format(url=mock.url)
    )
    app = create_app(routes, env={{}}, watch_interval=None)
    body = {{"model": "support-bot", "messages": [{{"role": "user", "content": "hi"}}]}}
    with RunningServer(app) as proxy:
        for _ in range(3):
            assert httpx.post(proxy.url + "/v1/chat/completions", json=body).status_code == 200
""")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, timeout=60, check=True
    )
    lines = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith(b"{")]
    assert [line["status"] for line in lines if line.get("event") == "request"] == [200, 200, 200]


def test_a_drain_asked_from_another_thread_runs_in_the_loops() -> None:
    """The metrics listener (`--metrics-port`) renders in a thread of its own: the queue and
    its timer are the loop's, so the drain is handed to the loop, and waited for."""
    ran_in: list[int] = []
    batched: list[Batched] = []

    async def run() -> None:
        made = Batched((("a", lambda r: ran_in.append(threading.get_ident())),), lambda n: None)
        batched.append(made)
        for record in _records(3):
            made(record)
        await asyncio.to_thread(made.drain)  # another thread asks, the loop runs it
        assert made.pending == 0

    asyncio.run(run())
    assert ran_in == [threading.main_thread().ident] * 3
