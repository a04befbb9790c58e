"""Client keys: 401 for a missing or unknown key, 403 for a model the key may not use, 429 past
its rpm/tpm; the key's name (never the key) on metrics and in the access log."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from proxy.admission import (
    KEY_PREFIX,
    Limits,
    check_model,
    hash_key,
    identify,
)
from proxy.app import create_app
from proxy.cli import main
from proxy.config import ClientKey, ConfigError, parse_config
from proxy.errors import ModelNotAllowed, RateLimited, Unauthorized
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.conftest import UPSTREAM_KEY
from tests.helpers import ROOT, sluicegate, wait_for
from tests.test_metering_e2e import scrape, total

# Shaped like real provider keys, so a leak would look like one.
TEAM_KEY = "sk-proj-" + "Tm9yZWFsa2V5aGVyZV9qdXN0X2Ffc2hhcGVfb2Zfb25l" + "T3BlbkFJ" + "x7Qw"
BOT_KEY = "sk-ant-api03-" + "b3RoZXJfdGVhbV9rZXlfbm90X3JlYWxfYXRfYWxsX2p1c3Rfc2hhcGU" + "-AA"
STRANGER_KEY = "sk-" + "c3RyYW5nZXJfa2V5X25vdF9pbl90aGVfY29uZmlnX2F0X2FsbA"

KEYS = f"""\
keys:
  team-a: {{sha256: {hash_key(TEAM_KEY)}}}
  support.bot:
    sha256: {hash_key(BOT_KEY).upper()}
    models: [support-bot]
    rpm: 3
"""


def _routes(mock_url: str, keys: str = KEYS, tpm: str = "") -> str:
    return f"""\
upstreams:
  mock: {{base_url: '{mock_url}/v1', api_key: '${{MOCK_API_KEY:-}}'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
  - {{model: premium, targets: [{{upstream: mock, model: mock-chat}}]}}
pricing:
  mock-chat: {{input: 0.28, output: 0.42}}
{keys}{tpm}"""


MESSAGES: Any = [{"role": "user", "content": "hello there"}]
FAST = {"mock": {"tokens": 4, "delay": 0, "ttft": 0}}


@pytest.fixture
def keyed(
    tmp_path: Path, mock_app: MockUpstream, mock_server: RunningServer
) -> Iterator[tuple[RunningServer, list[RequestRecord], Path]]:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url))
    finished: list[RequestRecord] = []
    app = create_app(
        path, env={"MOCK_API_KEY": UPSTREAM_KEY}, watch_interval=0.05, observers=(finished.append,)
    )
    with RunningServer(app) as proxy:
        yield proxy, finished, path


def _client(proxy: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def _chat(client: openai.OpenAI, model: str = "support-bot") -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, extra_body=FAST)


# --- through the real SDK -----------------------------------------------------------------


def test_missing_and_unknown_keys_get_401_without_an_echo(keyed: Any) -> None:
    proxy, finished, _ = keyed
    for key in (STRANGER_KEY, TEAM_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            _chat(_client(proxy, key))
        body = info.value.response.text
        assert info.value.code == "invalid_api_key"
        assert key not in body
        assert key[-6:] not in body  # not even OpenAI's masked form
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "support-bot"}, timeout=5)
    assert r.status_code == 401
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    r = httpx.post(
        proxy.url + "/v1/embeddings",
        json={"model": "support-bot", "input": "x"},
        headers={"authorization": f"Basic {TEAM_KEY}"},
        timeout=5,
    )
    assert r.status_code == 401  # only Bearer carries a key
    assert wait_for(lambda: len(finished) == 4)
    assert {r.status for r in finished} == {401}
    assert all(r.key_name is None for r in finished)


def test_a_known_key_is_served_and_named_in_metrics_and_log(
    keyed: Any, mock_app: MockUpstream
) -> None:
    proxy, finished, _ = keyed
    seen = len(mock_app.records)
    with capture_logs() as logs:
        answer = _chat(_client(proxy, TEAM_KEY), "premium")
        for _ in _client(proxy, BOT_KEY).chat.completions.create(
            model="support-bot", messages=MESSAGES, stream=True, extra_body=FAST
        ):
            pass
        assert answer.choices[0].message.content
        assert wait_for(lambda: len(finished) == 2)
        # access-log lines are written in batches, up to 50 ms later (proxy.observe.batch)
        assert wait_for(lambda: sum(e["event"] == "request" for e in logs) == 2)
    assert [r.key_name for r in finished] == ["team-a", "support.bot"]
    requests = [e for e in logs if e["event"] == "request"]
    assert [e["key_name"] for e in requests] == ["team-a", "support.bot"]
    # The client's key never goes upstream; the upstream's own key does.
    sent = mock_app.records[seen:]
    assert [r.headers.get("authorization") for r in sent] == [f"Bearer {UPSTREAM_KEY}"] * 2
    samples = scrape(proxy.url)
    for name in ("team-a", "support.bot"):
        assert total(samples, "sluicegate_requests_total", key=name, status="200") == 1
        assert total(samples, "sluicegate_tokens_total", key=name, type="output") == 4
        assert total(samples, "sluicegate_cost_usd_total", key=name) > 0
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    for secret in (TEAM_KEY, BOT_KEY, hash_key(TEAM_KEY), UPSTREAM_KEY):
        assert secret not in text
        assert secret not in repr(logs)


def test_a_model_outside_the_keys_list_is_403(keyed: Any) -> None:
    proxy, finished, _ = keyed
    with pytest.raises(openai.PermissionDeniedError) as info:
        _chat(_client(proxy, BOT_KEY), "premium")
    assert info.value.code == "model_not_allowed"
    assert "support.bot" in info.value.message
    with pytest.raises(openai.NotFoundError):  # an unknown model is still a 404
        _chat(_client(proxy, BOT_KEY), "no-such-model")
    assert wait_for(lambda: len(finished) == 2)
    assert [(r.status, r.key_name) for r in finished] == [
        (403, "support.bot"),
        (404, "support.bot"),
    ]
    samples = scrape(proxy.url)
    assert total(samples, "sluicegate_requests_total", key="support.bot", status="403") == 1


def test_requests_per_minute_give_429_with_retry_after(keyed: Any) -> None:
    proxy, _, _ = keyed
    client = _client(proxy, BOT_KEY)
    for _ in range(3):
        _chat(client)
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.type == "requests"
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 20  # 3 per minute: one request back every 20 s
    _chat(_client(proxy, TEAM_KEY))  # other keys have their own limits


def test_tokens_per_minute_are_charged_with_real_usage(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url, tpm="    tpm: 5\n"))
    with RunningServer(create_app(path, env={}, watch_interval=None)) as proxy:
        client = _client(proxy, BOT_KEY)
        _chat(client)  # admitted with a full bucket, then charged its 10 tokens
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client)
        assert info.value.type == "tokens"
        assert int(info.value.response.headers["retry-after"]) >= 1


def test_keys_are_reloaded_like_the_rest_of_the_config(keyed: Any, mock_server: Any) -> None:
    proxy, _, path = keyed
    _chat(_client(proxy, TEAM_KEY))
    path.write_text(_routes(mock_server.url, keys=f"keys:\n  other: {{sha256: {'f' * 64}}}\n"))
    assert wait_for(lambda: _status(proxy, TEAM_KEY) == 401)
    path.write_text(_routes(mock_server.url, keys=""))  # no keys: open again
    assert wait_for(lambda: _status(proxy, STRANGER_KEY) == 200)


def _status(proxy: RunningServer, key: str) -> int:
    body = {"model": "support-bot", "messages": MESSAGES, **FAST}
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=5)
    return r.status_code


def test_models_need_a_key_and_list_what_it_may_use(keyed: Any) -> None:
    proxy, _, _ = keyed
    with pytest.raises(openai.AuthenticationError):
        _client(proxy, STRANGER_KEY).models.list()
    team = [m.id for m in _client(proxy, TEAM_KEY).models.list()]
    bot = [m.id for m in _client(proxy, BOT_KEY).models.list()]
    assert (team, bot) == (["support-bot", "premium"], ["support-bot"])


# --- config ---------------------------------------------------------------------------------


def test_keys_parse_into_hashes_models_and_limits() -> None:
    config = parse_config(_routes("http://127.0.0.1:9"), "r.yaml", {"MOCK_API_KEY": "k"})
    assert config.keys == (
        ClientKey("team-a", hash_key(TEAM_KEY)),
        ClientKey("support.bot", hash_key(BOT_KEY), ("support-bot",), rpm=3),
    )
    assert config.key(hash_key(BOT_KEY)) == config.keys[1]
    assert config.summary() == "r.yaml: 1 upstream, 2 routes, 1 priced model, 2 client keys"


@pytest.mark.parametrize(
    ("keys", "path", "expected"),
    [
        ("  'bad name!': {sha256: " + "a" * 64 + "}", "keys.bad name!", "key name"),
        (f"  a: {{sha256: {TEAM_KEY}}}", "keys.a.sha256", "64 hex digits"),
        ("  a: {}", "keys.a", "missing required key 'sha256'"),
        ("  a: {sha256: " + "a" * 64 + ", models: [nope]}", "keys.a.models[0]", "route model"),
        ("  a: {sha256: " + "a" * 64 + ", models: []}", "keys.a.models", "at least one"),
        ("  a: {sha256: " + "a" * 64 + ", rpm: 0}", "keys.a.rpm", "1 or more"),
        ("  a: {sha256: " + "a" * 64 + ", key: x}", "keys.a.key", "unknown key 'key'"),
        ("  a: {sha256: " + "a" * 64 + "}\n  b: {sha256: " + "A" * 64 + "}", "keys.b.sha256",
         "listed twice"),
    ],
)  # fmt: skip
def test_key_mistakes_name_the_path_and_never_echo_a_key(
    keys: str, path: str, expected: str
) -> None:
    text = _routes("http://127.0.0.1:9", keys="keys:\n" + keys + "\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "r.yaml", {"MOCK_API_KEY": "k"})
    messages = [str(i) for i in info.value.issues]
    assert any(f": {path}: " in m and expected in m for m in messages), messages
    assert TEAM_KEY not in str(info.value)


# --- the pure parts ---------------------------------------------------------------------------


def test_identify_reads_only_bearer_tokens() -> None:
    config = parse_config(_routes("http://127.0.0.1:9"), "r.yaml", {"MOCK_API_KEY": "k"})
    assert identify(config, [(b"authorization", f"Bearer  {TEAM_KEY} ".encode())]) is not None
    assert identify(config, [(b"authorization", f"bearer {BOT_KEY}".encode())]) is not None
    for headers in ([], [(b"authorization", b"Bearer")], [(b"x-api-key", TEAM_KEY.encode())]):
        with pytest.raises(Unauthorized):
            identify(config, headers)
    open_config = parse_config(_routes("http://127.0.0.1:9", keys=""), "r.yaml", {})
    assert identify(open_config, []) is None


def test_check_model() -> None:
    check_model(None, "anything")
    check_model(ClientKey("a", "0" * 64), "anything")
    with pytest.raises(ModelNotAllowed):
        check_model(ClientKey("a", "0" * 64, ("x",)), "y")


def test_buckets_refill_at_the_configured_rate() -> None:
    limits, key = Limits(), ClientKey("a", "0" * 64, rpm=60, tpm=600)
    for _ in range(60):
        limits.admit(key, 100.0)
    with pytest.raises(RateLimited) as info:
        limits.admit(key, 100.0)
    assert info.value.retry_after == pytest.approx(1.0)
    limits.admit(key, 101.0)  # one second brings one request back
    limits.charge(key, 1200, 101.0)  # twice the minute's tokens: 600 → -600
    with pytest.raises(RateLimited) as tokens:
        limits.admit(key, 102.0)  # a request is back, but tokens are at -590
    assert tokens.value.type == "tokens"
    assert tokens.value.retry_after == pytest.approx((1 + 590) * 60 / 600)
    limits.admit(key, 162.0)  # a minute later the bucket is back above zero
    limits.admit(None, 0.0)
    limits.charge(None, 10, 0.0)
    limits.charge(ClientKey("b", "1" * 64), 10, 0.0)  # no tpm: nothing to charge


# --- the command ------------------------------------------------------------------------------


def test_hash_key_reads_stdin_and_new_makes_a_key() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-key"],
        input=TEAM_KEY + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert done.stdout.strip() == hash_key(TEAM_KEY)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["hash-key", "--new"]) == 0
    key_line, hash_line = out.getvalue().splitlines()
    key = key_line.split()[-1]
    assert key.startswith(KEY_PREFIX)
    assert len(key) > 40
    assert hash_line.split()[-1] == hash_key(key)
    empty = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-key"],
        input="",
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    assert empty.returncode == 1


def test_an_open_proxy_says_so_at_start(tmp_path: Path, mock_server: RunningServer) -> None:
    said = []
    for name, keys in (("open.yaml", ""), ("keyed.yaml", KEYS)):
        path = tmp_path / name
        path.write_text(_routes(mock_server.url, keys=keys))
        with sluicegate("serve", "--config", str(path), output=subprocess.PIPE) as (proc, _):
            pass
        assert proc.stdout is not None
        with proc.stdout:
            said.append(b'"event":"open_proxy"' in proc.stdout.read())
    assert said == [True, False]
