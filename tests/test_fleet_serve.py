"""Fleet state end to end: three `sluicegate serve` processes (one with `--workers 2`) share
one real redis-server, driven by the openai SDK and httpx.

rpm holds across the fleet (and, as a control, does not without `state:`); a budget is
refused everywhere once spent, and the spend in Redis equals the mock's ground truth; an
always-503 upstream is cooled down everywhere after `failures` failures in total; Redis
killed and restarted loses nothing; `sluicegate keys` and /metrics show the spend.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.admission import hash_key
from proxy.fleet.shared import FLUSH_SECONDS
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.serving import RunningServer
from tests.helpers import ROOT, sluicegate, wait_for
from tests.redis_server import RedisServer
from tests.test_metering_e2e import scrape, total

PASSWORD = "fleet-" + secrets.token_urlsafe(24)
NAMES = ("hammer", "spender", "steady", "prober")
KEYS = {name: "sk-sg-" + secrets.token_urlsafe(32) for name in NAMES}
PRICE_IN, PRICE_OUT = 10, 20  # USD per million tokens: whole micro-dollars per token
BUDGET_USD = 0.01
HI: Any = [{"role": "user", "content": "hi there"}]


def routes_yaml(mock_url: str, broken_url: str, *, shared: bool = True) -> str:
    # A generous timeout: the test machine is shared, and a slow call falls back to local.
    state = "state: {url: '${REDIS_URL}', timeout: 1.0}\n" if shared else ""
    return f"""\
server: {{finish_after_abort: 5, drain_seconds: 1}}
upstreams:
  mock: {{base_url: '{mock_url}/v1'}}
  broken: {{base_url: '{broken_url}/v1', cooldown: {{failures: 3, seconds: 60}}}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}], retries: 0}}
  - model: broken
    targets: [{{upstream: broken, model: mock-chat}}]
    fallbacks: [{{upstream: mock, model: mock-chat}}]
    retries: 0
pricing:
  mock-chat: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
{state}keys:
  hammer: {{sha256: '{hash_key(KEYS["hammer"])}', rpm: 60}}
  spender: {{sha256: '{hash_key(KEYS["spender"])}', budget: {{usd: {BUDGET_USD}, period: total}}}}
  steady:
    sha256: '{hash_key(KEYS["steady"])}'
    rpm: 100000
    budget: {{usd: 100, period: day}}
  prober: {{sha256: '{hash_key(KEYS["prober"])}'}}
"""


@dataclass
class Fleet:
    redis: RedisServer
    mock: MockUpstream
    broken: MockUpstream
    urls: list[str]
    logs: list[Path]
    config: Path


@contextlib.contextmanager
def serve_fleet(
    config: Path, logs_dir: Path, env: dict[str, str], workers: tuple[int, ...] = (1, 1, 2)
) -> Iterator[list[str]]:
    """A serve process on `config` for each entry of `workers`; logs to files."""
    with contextlib.ExitStack() as stack:
        urls = []
        for i, count in enumerate(workers):
            log = stack.enter_context((logs_dir / f"serve-{i}.log").open("wb"))
            args = ("serve", "--config", str(config), "--no-watch", "--workers", str(count))
            _, url = stack.enter_context(sluicegate(*args, env=env, output=log))
            urls.append(url)
        yield urls


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    mock, broken = MockUpstream(), MockUpstream(Knobs(status=503))
    with (
        RedisServer(PASSWORD) as redis_server,
        RunningServer(mock) as mock_server,
        RunningServer(broken) as broken_server,
    ):
        config = tmp / "routes.yaml"
        config.write_text(routes_yaml(mock_server.url, broken_server.url))
        env = {"REDIS_URL": redis_server.url}
        with serve_fleet(config, tmp, env) as urls:
            yield Fleet(redis_server, mock, broken, urls, sorted(tmp.glob("serve-*.log")), config)


def _chat(url: str, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "support-bot", "messages": HI, **extra}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def _hammer(urls: list[str]) -> list[httpx.Response]:
    """90 requests with the rpm-60 key, round-robin over the processes, 9 at a time."""
    with ThreadPoolExecutor(9) as pool:
        jobs = [pool.submit(_chat, urls[i % len(urls)], KEYS["hammer"]) for i in range(90)]
        return [job.result() for job in jobs]


def test_requests_per_minute_hold_across_the_fleet(fleet: Fleet) -> None:
    started = time.monotonic()
    answers = _hammer(fleet.urls)
    refill = math.ceil(time.monotonic() - started)  # the bucket's documented tolerance:
    admitted = [r for r in answers if r.status_code == 200]  # it refills 1 a second
    refused = [r for r in answers if r.status_code == 429]
    assert len(admitted) + len(refused) == 90
    assert 60 <= len(admitted) <= 60 + refill
    assert not any("state_unavailable" in path.read_text() for path in fleet.logs)
    for response in refused:
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(response.headers["retry-after"]) >= 1


def test_without_state_each_process_grants_the_limit_again(fleet: Fleet, tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    mock_url = fleet.urls[0]  # unused by the control: only admission is counted
    config.write_text(routes_yaml(mock_url, mock_url, shared=False).replace(
        f"'{mock_url}/v1'", f"'{_mock_url(fleet)}/v1'", 1
    ))  # fmt: skip
    with serve_fleet(config, tmp_path, {}, workers=(1, 1)) as urls:
        admitted = sum(r.status_code == 200 for r in _hammer(urls))
    assert admitted == 90  # 2 processes x 60 > 90: the per-process limit never bites


def _mock_url(fleet: Fleet) -> str:
    text = fleet.config.read_text()
    return text.split("mock: {base_url: '", 1)[1].split("/v1'", 1)[0]


def _cost_micros(records: list[Any]) -> int:
    return sum(r.prompt_tokens * PRICE_IN + r.completion_tokens * PRICE_OUT for r in records)


def _spend(fleet: Fleet, name: str, period: str) -> int:
    with fleet.redis.client() as client:
        return int(client.get(f"sluicegate:{{{name}}}:spend:{period}") or 0)


def _mixed(url: str, key: str, i: int) -> int:
    """One request of a mix: non-stream, stream, or a stream the client abandons early."""
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "support-bot", "messages": HI, "stream": i % 3 != 0}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200 or i % 3 != 2:
                r.read()
                return r.status_code
            next(r.iter_bytes())  # then leave: the proxy reads the rest (finish_after_abort)
        return 200


def test_a_budget_is_refused_everywhere_once_spent_and_charged_exactly(fleet: Fleet) -> None:
    seen = len(fleet.mock.records)

    def spend_until_refused(url: str) -> None:
        for i in range(200):
            if _mixed(url, KEYS["spender"], i) == 429:
                return
        pytest.fail("the budget never ran out")

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(spend_until_refused, fleet.urls))
    records = fleet.mock.records[seen:]
    truth = _cost_micros(records)
    # Charges land as each request ends: wait for the last, then compare to the micro-dollar.
    assert wait_for(lambda: _spend(fleet, "spender", "total") == truth, 10), (
        _spend(fleet, "spender", "total"),
        truth,
    )
    budget = round(BUDGET_USD * 1_000_000)
    largest = max(_cost_micros([r]) for r in records)
    # In flight at the crossing: each of the 3 clients' open request, and the stream it may
    # have just abandoned that the proxy is still reading to its end (finish_after_abort);
    # and, charges being written behind, one that ended within FLUSH_SECONDS before it (a
    # request takes at least the mock's 50 ms ttft, so no more than one per client).
    assert Knobs().ttft > FLUSH_SECONDS
    assert budget <= truth <= budget + 9 * largest
    for url in fleet.urls:
        calls: list[httpx.Request] = []
        with (
            httpx.Client(event_hooks={"request": [calls.append]}) as http,
            openai.OpenAI(
                base_url=url + "/v1", api_key=KEYS["spender"], max_retries=2, http_client=http
            ) as client,
            pytest.raises(openai.RateLimitError) as info,
        ):
            client.chat.completions.create(model="support-bot", messages=HI)
        assert len(calls) == 1  # x-should-retry: false — the SDK does not try again
        assert info.value.response.headers["x-should-retry"] == "false"
        error = info.value.body
        assert isinstance(error, dict)
        assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
        assert error["message"] == "The key 'spender' has used its total budget. It does not reset."


def test_metrics_and_the_keys_command_show_the_spend(fleet: Fleet) -> None:
    spent = _spend(fleet, "spender", "total") / 1_000_000
    assert spent > 0

    def gauge(url: str) -> float:
        return total(scrape(url), "sluicegate_key_spend_usd", key="spender", period="total")

    for url in fleet.urls:
        assert wait_for(lambda url=url: gauge(url) == pytest.approx(spent), 10)  # type: ignore[misc]
        samples = scrape(url)
        assert total(samples, "sluicegate_key_budget_usd", key="spender") == BUDGET_USD
        assert total(samples, "sluicegate_state_up") == 1
    env = {**os.environ, "REDIS_URL": fleet.redis.url}
    command = [sys.executable, "-m", "proxy", "keys", "--config", str(fleet.config)]
    listed = subprocess.run(
        [*command, "--json"], capture_output=True, env=env, cwd=ROOT, check=True
    )
    rows = {row["key"]: row for row in orjson.loads(listed.stdout)}
    assert rows["spender"]["spent_usd"] == pytest.approx(spent, abs=1e-9)
    assert rows["spender"]["remaining_usd"] == 0
    assert (rows["hammer"]["rpm"], rows["hammer"]["budget_usd"]) == (60, None)
    table = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, check=True)
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["key", "rpm", "tpm", "budget_usd", "period", "spent_usd",
                                "remaining_usd"]  # fmt: skip
    assert f"{spent:.6f}" in next(line for line in lines if line.startswith("spender"))


def test_an_upstream_failing_anywhere_is_cooled_down_everywhere(fleet: Fleet) -> None:
    key = KEYS["prober"]
    for url in fleet.urls:  # one failure on each process: 3 in all, the upstream's `failures`
        assert _chat(url, key, model="broken").status_code == 200  # from the fallback
    assert len(fleet.broken.records) == 3

    def cooling(url: str) -> bool:
        return total(scrape(url), "sluicegate_upstream_cooldown", upstream="broken") == 1

    for url in fleet.urls:
        assert wait_for(lambda url=url: cooling(url), 10)  # type: ignore[misc]
    for url in [*fleet.urls, fleet.urls[2], fleet.urls[2]]:  # both workers of the third
        assert _chat(url, key, model="broken").status_code == 200
    assert len(fleet.broken.records) == 3  # each process skipped it (per process: 1 of 3)


def test_redis_killed_and_restarted_in_open_mode_loses_nothing(fleet: Fleet) -> None:
    seen = len(fleet.mock.records)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for i in range(6):
        assert _mixed(fleet.urls[i % 3], KEYS["steady"], i) == 200
    fleet.redis.kill()
    with ThreadPoolExecutor(3) as pool:
        during = list(pool.map(lambda i: _mixed(fleet.urls[i % 3], KEYS["steady"], i), range(12)))
    assert during == [200] * 12  # admitted on local state, none failed
    for url in fleet.urls:
        assert total(scrape(url), "sluicegate_state_errors_total") >= 1
    fleet.redis.start()  # empty
    for url in fleet.urls:
        assert wait_for(lambda url=url: total(scrape(url), "sluicegate_state_up") == 1, 10)  # type: ignore[misc]
    for i in range(6):  # each process's next call finds the state gone and writes back
        assert _mixed(fleet.urls[i % 3], KEYS["steady"], i) == 200
    truth = _cost_micros(fleet.mock.records[seen:])
    assert wait_for(lambda: _spend(fleet, "steady", day) == truth, 10), (
        _spend(fleet, "steady", day),
        truth,
    )
    for path in fleet.logs:
        events = [orjson.loads(line).get("event") for line in path.read_bytes().splitlines()
                  if line.startswith(b"{")]  # fmt: skip
        # One line per transition, not per request (each process served 4 while it was
        # down); a worker that had no call to make while Redis was away has nothing to say.
        down = events.count("state_unavailable")
        assert 1 <= down <= (2 if path.name.endswith("2.log") else 1)
        assert events.count("state_restored") == down


def test_closed_mode_refuses_keyed_requests_while_redis_is_down(
    fleet: Fleet, tmp_path: Path
) -> None:
    config = tmp_path / "routes.yaml"
    text = routes_yaml(_mock_url(fleet), _mock_url(fleet))
    config.write_text(text.replace("timeout: 1.0}", "timeout: 1.0, on_unavailable: closed}"))
    log = tmp_path / "serve.log"
    with (
        RedisServer(PASSWORD) as redis_server,
        log.open("wb") as output,
        sluicegate(
            "serve", "--config", str(config), "--no-watch",
            env={"REDIS_URL": redis_server.url}, output=output,
        ) as (_, url),
    ):  # fmt: skip
        assert _chat(url, KEYS["steady"]).status_code == 200
        redis_server.kill()
        refused = [_chat(url, KEYS["steady"]) for _ in range(3)]
        assert [r.status_code for r in refused] == [503] * 3
        for response in refused:
            assert response.json()["error"]["code"] == "state_unavailable"
            assert response.headers["retry-after"] == "1"
        assert _chat(url, KEYS["prober"]).status_code == 200  # no limits: needs no store
        assert httpx.get(url + "/readyz").status_code == 200
        samples = scrape(url)
        assert total(samples, "sluicegate_state_up") == 0
        assert total(samples, "sluicegate_state_errors_total") >= 1
        redis_server.start()
        assert wait_for(lambda: _chat(url, KEYS["steady"]).status_code == 200, 10)
        assert total(scrape(url), "sluicegate_state_up") == 1
    events = [orjson.loads(line)["event"] for line in log.read_bytes().splitlines()
              if line.startswith(b"{")]  # fmt: skip
    assert events.count("state_unavailable") == events.count("state_restored") == 1
