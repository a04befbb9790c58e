"""Secrets stay put: upstream keys, client keys and the metrics token appear nowhere in what a
run of the proxy produces, and client credentials never travel upstream.

Real `sluicegate serve` processes (one worker; `--workers 2` with `--metrics-port`) run at
`--log-level debug` with keys shaped like real provider keys, and the openai SDK drives every
kind of answer through them. Everything produced is kept: the processes' stdout and stderr,
every status line, header and body the clients got, the SDK's exceptions, `/metrics` on both
ports, the workers' metrics files, the output of `sluicegate check` and `serve` on broken
files, and (in-process) what an embedder's observer is handed and the log events as logged.
Then it is searched for the secrets (see `Key.pieces` for the rule). SLUICEGATE_SHOW_SEEN=1
(with -s) writes what the runs produced to a file and prints its path.

Header hygiene rules themselves are tested in test_headers.py; here they are checked end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import string
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer
from tests.helpers import ROOT, free_port, sluicegate, wait_for
from tests.redis_server import RedisServer

URLSAFE = string.ascii_letters + string.digits + "-_"
WINDOW = 8  # characters: the shortest piece of a secret that counts as a leak


def _chars(count: int, alphabet: str = URLSAFE) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(count))


@dataclass(frozen=True)
class Key:
    """A secret and the provider's published prefix, which is not secret."""

    name: str
    value: str
    public: str = ""

    def pieces(self) -> list[str]:
        """Every WINDOW characters of the secret part. Eight characters are 48 bits of
        base64url or 32 of hex: a masked form that keeps that much ("sk-...last8", the first
        eight after the prefix) still identifies the key and gives a guesser a head start, so
        it counts as a leak. Shorter fragments pass: a provider's prefix, or the last four
        characters OpenAI itself shows of a key."""
        secret = self.value[len(self.public) :]
        return [secret[i : i + WINDOW] for i in range(len(secret) - WINDOW + 1)]


OPENAI = Key("OPENAI_API_KEY", "sk-proj-" + _chars(64), "sk-proj-")
ANTHROPIC = Key("ANTHROPIC_API_KEY", "sk-ant-api03-" + _chars(92) + "-AA", "sk-ant-api03-")
DEEPSEEK = Key("DEEPSEEK_API_KEY", "sk-" + secrets.token_hex(16), "sk-")
GEMINI = Key("GEMINI_API_KEY", "AIza" + _chars(35), "AIza")
# As `kubectl create secret --from-file` often makes it: with a trailing newline (trimmed).
PASTED = Key("PASTED_API_KEY", "sk-proj-" + _chars(64), "sk-proj-")
URL_PASSWORD = Key("a password in a base_url", _chars(32))
METRICS_TOKEN = Key("METRICS_TOKEN", _chars(43))
CLIENT = Key("client", "sk-sg-" + _chars(43), "sk-sg-")  # as `sluicegate hash-key --new`
NARROW = Key("narrow client", "sk-sg-" + _chars(43), "sk-sg-")
COOKIE = Key("client cookie", "session=" + _chars(32), "session=")
REDIS = Key("REDIS_URL's password", _chars(40))  # state.url: limits shared through Redis
EGRESS = Key("EGRESS_PASSWORD", _chars(32))  # an upstream's `proxy:` credentials
AZURE = Key("AZURE_OPENAI_KEY", secrets.token_hex(16))  # sent in a `headers:` api-key
UPSTREAM_KEYS = (OPENAI, ANTHROPIC, DEEPSEEK, GEMINI)
SECRETS = (
    *UPSTREAM_KEYS,
    PASTED,
    URL_PASSWORD,
    METRICS_TOKEN,
    CLIENT,
    NARROW,
    COOKIE,
    REDIS,
    EGRESS,
    AZURE,
)
ENV = {
    key.name: key.value
    for key in (OPENAI, ANTHROPIC, DEEPSEEK, GEMINI, METRICS_TOKEN, EGRESS, AZURE)
}
# Nothing listens there (`check` never connects); `serve` gets a real redis-server's URL.
ENV["REDIS_URL"] = f"redis://:{REDIS.value}@127.0.0.1:9/0"
ENV["REDIS_BAD_URL"] = f"http://:{REDIS.value}@127.0.0.1:9/0"  # the wrong scheme
ENV[PASTED.name] = PASTED.value + "\n"
# Near misses: their difference from the real thing is at the end, so an echo of one shows
# WINDOW-long pieces of the real key.
WRONG_CLIENT_KEY = CLIENT.value[:-4] + "zzzz"
WRONG_METRICS_TOKEN = METRICS_TOKEN.value[:-4] + "zzzz"
ROUTES = {"gpt": OPENAI, "claude": ANTHROPIC, "deepseek": DEEPSEEK, "gemini": GEMINI}
HI: Any = [{"role": "user", "content": "hi"}]
# The one honest way to a traceback found: a base_url whose host has a label longer than DNS
# allows passes `check`, and aiohttp refuses it only as it connects (a UnicodeError, which is a
# ValueError), so the proxy answers 500 and logs the traceback.
TRACEBACK = "Traceback (most recent call last)"
MISTYPED_HOST = "a" * 64 + ".example"


def _sha256(key: Key) -> str:
    return hashlib.sha256(key.value.encode()).hexdigest()


def routes_yaml(mock_url: str, dead_port: int, *, rpm: int = 1000, broken: bool = False) -> str:
    """Four providers' keys from the environment, an unreachable upstream, the pasted key, an
    upstream whose host no resolver takes, two client keys by hash. `broken`: refused, with the
    OpenAI key reached through ${...} in fields whose errors quote values, a token with a space,
    the raw client key pasted where its hash belongs, and an invalid base_url with a password."""
    token = "${METRICS_TOKEN} x" if broken else "${METRICS_TOKEN}"
    lines = [f"server: {{metrics_token: '{token}', drain_seconds: 1}}", "upstreams:"]
    for route, key in ROUTES.items():
        url = f"{mock_url}/v1"
        extra = ""
        if broken and key is OPENAI:
            url, extra = f"${{{key.name}}}", f", max_connections: '${{{key.name}}}'"
        lines.append(f"  {route}: {{base_url: '{url}', api_key: '${{{key.name}}}'{extra}}}")
    lines += [
        f"  offline: {{base_url: 'http://127.0.0.1:{dead_port}/v1',"
        f" api_key: '${{{GEMINI.name}}}', timeouts: {{connect: 1, read: 2}}}}",
        f"  pasted: {{base_url: '{mock_url}/v1', api_key: '${{{PASTED.name}}}'}}",
        f"  mistyped: {{base_url: 'http://{MISTYPED_HOST}/v1', api_key: '${{{PASTED.name}}}'}}",
        # Its proxy refuses connections: the credentials ride along into an error path.
        f"  egress: {{base_url: 'https://far.example/v1', timeouts: {{connect: 1}},"
        f" proxy: 'http://egress:${{{EGRESS.name}}}@127.0.0.1:{dead_port}'}}",
        f"  azure: {{base_url: '{mock_url}/openai/deployments/d', query: {{api-version: v1}},"
        f" headers: {{api-key: '${{{AZURE.name}}}'}}}}",
    ]
    if broken:
        lines.append(f"  creds: {{base_url: 'ftp://user:{URL_PASSWORD.value}@h/v1'}}")
    lines.append("routes:")
    for route in (*ROUTES, "offline", "pasted", "mistyped", "egress", "azure"):
        target = f"{{upstream: {route}, model: m-{route}}}"
        lines.append(f"  - {{model: {route}, targets: [{target}], retries: 0}}")
    lines.append("pricing:")
    lines += [f"  m-{route}: {{input: 1, output: 2}}" for route in ROUTES]
    app_key = CLIENT.value if broken else _sha256(CLIENT)
    redis_url = "${REDIS_BAD_URL}" if broken else "${REDIS_URL}"
    lines += [
        f"state: {{url: '{redis_url}', timeout: 1}}",
        "keys:",
        f"  app: {{sha256: '{app_key}', rpm: {rpm}}}",
        f"  narrow: {{sha256: '{_sha256(NARROW)}', models: [gpt]}}",
    ]
    return "\n".join(lines) + "\n"


class Seen:
    """Everything a run produced, by where it came from."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.append((where, text))

    def leaks(self, keys: tuple[Key, ...] = SECRETS) -> list[str]:
        found = []
        for where, text in self.texts:
            for key in keys:
                hits = [piece for piece in key.pieces() if piece in text]
                if hits:
                    found.append(f"{key.name} in {where}: {hits[0]!r} ({len(hits)} pieces)")
        return found

    def all(self) -> str:
        return "\n".join(text for _, text in self.texts)


def assert_nothing_leaked(seen: Seen) -> None:
    leaks = seen.leaks()
    assert not leaks, f"{len(leaks)} leak(s):\n" + "\n".join(leaks)


class Recorder(httpx.BaseTransport):
    """An httpx transport that keeps every response (status, headers, whole body)."""

    def __init__(self, seen: Seen) -> None:
        self._inner = httpx.HTTPTransport()
        self._seen = seen
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        body = response.read()
        response.close()
        headers = "".join(f"{k}: {v}\n" for k, v in response.headers.multi_items())
        where = f"{request.method} {request.url} -> {response.status_code}"
        self._seen.add(where, f"{headers}\n".encode() + body)
        kept = httpx.Response(response.status_code, headers=response.headers, content=body)
        self.responses.append(kept)
        return kept

    def close(self) -> None:
        self._inner.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(REDIS.value) as server:
        yield server


@pytest.fixture(scope="module")
def mock() -> Iterator[tuple[MockUpstream, RunningServer]]:
    app = MockUpstream()
    with RunningServer(app) as server:
        yield app, server


def _client(url: str, key: str, http: httpx.Client) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, http_client=http)


def _fails(seen: Seen, status: int, call: Any, **kwargs: Any) -> openai.APIStatusError:
    """`call(**kwargs)` must raise the SDK's error for `status`; its text is kept."""
    with pytest.raises(openai.APIStatusError) as raised:
        call(**kwargs)
    seen.add(f"the SDK's exception for {status}", f"{raised.value!s} {raised.value.body!r}")
    assert raised.value.status_code == status, raised.value
    return raised.value


def drive(url: str, http: httpx.Client, seen: Seen) -> None:
    """Every kind of answer, through the openai SDK."""
    app = _client(url, CLIENT.value, http)
    chat = app.chat.completions.create
    for route in (*ROUTES, "azure"):
        answer = chat(model=route, messages=HI, extra_headers={"cookie": COOKIE.value})
        assert answer.choices[0].message.content
        knobs: dict[str, object] = {"set_cookie": True}
        options: Any = {"include_usage": True}
        stream = chat(
            model=route, messages=HI, stream=True, stream_options=options,
            extra_body={"mock": knobs}, extra_headers={"cookie": COOKIE.value},
        )  # fmt: skip
        assert [chunk.usage for chunk in stream if chunk.usage]
        for status in (401, 429, 500):
            knobs = {"status": status, "echo_auth": True, "set_cookie": True}
            error = _fails(
                seen, status, chat, model=route, messages=HI, stream=status == 500,
                extra_body={"mock": knobs}, extra_headers={"cookie": COOKIE.value},
            )  # fmt: skip
            scrubbed = "'***'" if route == "azure" else "'Bearer ***'"  # api-key: no scheme
            assert f"credentials not accepted: {scrubbed}" in error.message  # echoed, scrubbed
    knobs = {"reset_after": 2}  # a reset mid-stream: the stream ends with an error event
    with pytest.raises(openai.APIError) as cut:
        for _ in chat(model="deepseek", messages=HI, stream=True, extra_body={"mock": knobs}):
            pass
    seen.add("the SDK's exception for a cut stream", str(cut.value))
    _fails(seen, 502, chat, model="offline", messages=HI)
    _fails(seen, 502, chat, model="egress", messages=HI)  # through a proxy that refuses
    assert chat(model="pasted", messages=HI).choices  # its key's newline trimmed
    _fails(seen, 500, chat, model="mistyped", messages=HI)  # the traceback
    wrong = _client(url, WRONG_CLIENT_KEY, http)
    _fails(seen, 401, wrong.chat.completions.create, model="gpt", messages=HI)
    _fails(seen, 401, wrong.models.list)
    assert http.post(url + "/v1/chat/completions", json={"model": "gpt"}).status_code == 401
    narrow = _client(url, NARROW.value, http)
    _fails(seen, 403, narrow.chat.completions.create, model="claude", messages=HI)
    assert [m.id for m in narrow.models.list()] == ["gpt"]
    assert len(app.models.list().data) == 9


def scrape(http: httpx.Client, url: str) -> None:
    assert http.get(url).status_code == 401
    wrong = {"authorization": f"Bearer {WRONG_METRICS_TOKEN}"}
    assert http.get(url, headers=wrong).status_code == 401
    ok = http.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN.value}"})
    assert ok.status_code == 200
    assert "sluicegate_requests_total" in ok.text


def replace_file(path: Path, text: str, log: Path, event: str, workers: int) -> None:
    """Swaps the routes file (a new inode, as a ConfigMap update does) and waits until every
    worker has logged `event`."""
    before = log.read_text().count(f'"{event}"')
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)
    seen_by_all = lambda: log.read_text().count(f'"{event}"') >= before + workers  # noqa: E731
    assert wait_for(seen_by_all, 20), f"{event} was not logged by {workers} worker(s)"


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers-and-metrics-port"])
def test_no_secret_in_anything_a_run_produces(
    tmp_path: Path,
    mock: tuple[MockUpstream, RunningServer],
    dead_port: int,
    workers: int,
    redis_server: RedisServer,
) -> None:
    upstream, mock_server = mock
    seen = Seen()
    path, log = tmp_path / "routes.yaml", tmp_path / "proxy.log"
    path.write_text(routes_yaml(mock_server.url, dead_port))
    args = ["serve", "--config", str(path), "--log-level", "debug"]
    env, metrics_port = {**ENV, "REDIS_URL": redis_server.url}, None
    if workers > 1:
        metrics_port = free_port()
        args += ["--workers", str(workers), "--metrics-port", str(metrics_port)]
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    first = len(upstream.records)
    recorder = Recorder(seen)
    with (
        log.open("wb") as sink,
        httpx.Client(transport=recorder, timeout=20) as http,
        sluicegate(*args, env=env, output=sink) as (_, url),
    ):
        metrics = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else url + "/metrics"
        drive(url, http, seen)
        scrape(http, metrics)
        if metrics_port:
            assert http.get(url + "/metrics").status_code == 404
        text = routes_yaml(mock_server.url, dead_port, rpm=999)
        replace_file(path, text, log, "config_reloaded", workers)
        text = routes_yaml(mock_server.url, dead_port, broken=True)
        replace_file(path, text, log, "config_reload_refused", workers)
        assert _client(url, CLIENT.value, http).models.list().data  # still serving
        scrape(http, metrics)
    output = log.read_text()
    seen.add("the proxy's stdout and stderr", output)
    for file in sorted((tmp_path / "prometheus").glob("*")):
        seen.add(f"metrics file {file.name}", file.read_bytes())

    # The secrets were in play: each upstream got its own key (and echoed it), the proxy
    # logged requests, reloads and a traceback, and the metrics were read.
    sent = upstream.records[first:]
    with redis_server.client() as client:  # the client key's rpm was checked in Redis
        assert client.exists("sluicegate:{app}:epoch")
    azure = [record.headers for record in sent if "api-key" in record.headers]
    assert {headers["api-key"] for headers in azure} == {AZURE.value}
    assert not [headers for headers in azure if "authorization" in headers]
    used = {record.headers["authorization"] for record in sent if "api-key" not in record.headers}
    assert used == {f"Bearer {key.value}" for key in (*UPSTREAM_KEYS, PASTED)}
    for marker in ('"event":"request"', '"config_reloaded"', '"config_reload_refused"'):
        assert output.count(marker) >= workers, marker  # JSON lines, from every worker
    assert TRACEBACK in output  # inside an `unhandled_error` JSON line, not uvicorn's text
    assert "a trailing newline was trimmed from the key" in output  # a config_warning
    assert "Exception in ASGI application" not in output
    # Client credentials never travel upstream: no cookie, and only the upstream's own key.
    assert not [record.headers for record in sent if "cookie" in record.headers]
    # Upstream cookies and hop-by-hop headers never reach the client (the mock sent both).
    assert len([r for r in recorder.responses if r.status_code in (401, 429, 500)]) >= 12
    for response in recorder.responses:
        assert "set-cookie" not in response.headers
        assert "keep-alive" not in response.headers
    assert_nothing_leaked(seen)
    if os.environ.get("SLUICEGATE_SHOW_SEEN"):  # to read what was searched
        (tmp_path / "seen.txt").write_text(seen.all())
        print(f"searched: {tmp_path / 'seen.txt'}")


def test_check_and_serve_refuse_broken_files_without_quoting_a_secret(
    tmp_path: Path, dead_port: int
) -> None:
    seen = Seen()
    good, broken, syntax = (tmp_path / name for name in ("good.yaml", "bad.yaml", "syntax.yaml"))
    good.write_text(routes_yaml("http://127.0.0.1:9", dead_port))
    broken.write_text(routes_yaml("http://127.0.0.1:9", dead_port, broken=True))
    # A raw key on the line where YAML gives up (an unclosed quote).
    syntax.write_text(
        f"upstreams:\n  gpt: {{base_url: 'http://h/v1', api_key: \"{OPENAI.value}}}\n"
    )
    port = str(free_port())
    runs = [
        ("check", str(good)),
        ("keys", "--config", str(good)),  # Redis unreachable: says so, quoting no URL
        ("check", str(broken)),
        ("check", str(syntax)),
        ("serve", "--config", str(broken), "--port", port),
        ("serve", "--config", str(syntax), "--port", port),
    ]
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            capture_output=True,
            env={**os.environ, **ENV},
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == (0 if args == ("check", str(good)) else 1), result.stderr
        seen.add(" ".join(args), result.stdout + result.stderr)
    text = seen.all()
    assert "cannot reach the state store" in text
    paths = ("server.metrics_token", "upstreams.gpt.base_url", "upstreams.creds.base_url")
    for path in (*paths, "keys.app.sha256", "state.url"):
        assert f": {path}: " in text  # the refusals were about the secrets' fields
    assert "invalid YAML" in text
    assert_nothing_leaked(seen)


def test_what_observers_are_handed_holds_no_secret(
    tmp_path: Path,
    mock: tuple[MockUpstream, RunningServer],
    dead_port: int,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process: an embedder's observer sees every RequestRecord (and here, fails on each);
    log events are checked as logged, before any redaction."""
    _, mock_server = mock
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(mock_server.url, dead_port))
    handed: list[RequestRecord] = []

    def nosy(record: RequestRecord) -> None:
        handed.append(record)
        raise RuntimeError("an embedder's observer fails")

    seen = Seen()
    server = RunningServer(create_app(path, env=ENV, watch_interval=None, observers=[nosy]))
    # Set up by RunningServer; it does not propagate to the root logger, where caplog listens.
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    with (
        contextlib.ExitStack() as cleanup,
        capture_logs() as events,
        server,
        httpx.Client(transport=Recorder(seen), timeout=20) as http,
    ):
        cleanup.callback(uvicorn_log.removeHandler, caplog.handler)
        chat = _client(server.url, CLIENT.value, http).chat.completions.create
        assert chat(model="gpt", messages=HI).choices  # served, the observer notwithstanding
        knobs = {"status": 401, "echo_auth": True}
        _fails(seen, 401, chat, model="claude", messages=HI, extra_body={"mock": knobs})
        wrong = _client(server.url, WRONG_CLIENT_KEY, http)
        _fails(seen, 401, wrong.chat.completions.create, model="gpt", messages=HI)
        crashed = _fails(seen, 500, chat, model="mistyped", messages=HI)
        assert crashed.code == "internal_error"
        assert chat(model="gemini", messages=HI).choices  # on the same pooled connection
        token = {"authorization": f"Bearer {METRICS_TOKEN.value}"}
        assert "sluicegate_requests_total" in http.get(server.url + "/metrics", headers=token).text
    assert [(r.route, r.status, r.error) for r in handed] == [
        ("gpt", 200, None),
        ("claude", 401, None),
        (None, 401, "invalid_api_key"),
        ("mistyped", 500, "internal_error"),
        ("gemini", 200, None),
    ]
    seen.add("the records observers were handed", "\n".join(map(repr, handed)))
    seen.add("log events as logged", repr(events))
    captured = capfd.readouterr()
    seen.add("stdout and stderr", captured.out + captured.err)
    crash = [event for event in events if event["event"] == "unhandled_error"]
    assert len(crash) == 1
    assert isinstance(crash[0]["exc_info"], ValueError)  # the host, refused by aiohttp
    assert not caplog.records  # nothing left for uvicorn to log: no plain-text traceback
    assert_nothing_leaked(seen)
