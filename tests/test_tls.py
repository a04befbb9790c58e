"""HTTPS upstreams: the mock upstream served over TLS with a CA made for the run
(proxy/mock/pki.py), and real proxies in front of it."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from proxy import cli
from proxy.app import create_app
from proxy.config import ConfigError, parse_config
from proxy.mock.pki import Pki
from proxy.mock.upstream import MockUpstream
from proxy.record import RequestRecord
from proxy.serving import RunningServer, ServerTls

MESSAGES = [{"role": "user", "content": "有哪些优惠? 🎉"}]
ROUTES = """\
upstreams:
  tls:
    base_url: {url}/v1
{tls}
routes:
  - model: bot
    targets: [{{upstream: tls, model: mock-chat}}]
"""


@pytest.fixture(scope="session")
def mtls_mock(pki: Pki) -> Iterator[tuple[MockUpstream, RunningServer]]:
    """An upstream that requires a client certificate signed by the test CA."""
    app = MockUpstream()
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca))
    with RunningServer(app, tls=tls) as server:
        yield app, server


def _proxy(
    tmp_path: Path, url: str, tls: dict[str, Any] | None, records: list[RequestRecord]
) -> RunningServer:
    block = "" if tls is None else f"    tls: {dict(tls)!r}".replace("'", '"')
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(url=url, tls=block))
    return RunningServer(create_app(path, observers=[records.append]))


def _post(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "seed": 7, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_answers_over_https_are_byte_exact(
    tmp_path: Path, pki: Pki, https_mock: tuple[MockUpstream, RunningServer], stream: bool
) -> None:
    _, upstream = https_mock
    options = {"stream_options": {"include_usage": True}} if stream else {}
    direct = httpx.post(
        upstream.url + "/v1/chat/completions",
        json={"model": "mock-chat", "messages": MESSAGES, "seed": 7, "stream": stream, **options},
        verify=ssl.create_default_context(cafile=pki.ca),
        timeout=10,
    )
    assert direct.status_code == 200
    with _proxy(tmp_path, upstream.url, {"ca_file": str(pki.ca)}, []) as proxy:
        via = _post(proxy.url, "bot", stream=stream, **options)
    assert via.status_code == 200
    assert via.content == direct.content
    assert max(via.content) >= 0x80  # raw multibyte UTF-8 went through


def test_an_untrusted_certificate_is_one_attempt_and_a_tls_502(
    tmp_path: Path, pki: Pki, https_mock: tuple[MockUpstream, RunningServer]
) -> None:
    app, upstream = https_mock
    seen, records = len(app.records), []
    with (
        capture_logs() as logs,
        _proxy(tmp_path, upstream.url, {"ca_file": str(pki.other_ca)}, records) as proxy,
    ):
        answer = _post(proxy.url, "bot", stream=True)
        metrics = httpx.get(proxy.url + "/metrics").text
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "upstream_tls_error"
    assert error["message"].startswith("the certificate of upstream 'tls' could not be verified")
    assert "unable to get local issuer certificate" in error["message"]  # OpenSSL's reason
    assert [a.outcome for a in records[0].attempts] == ["tls_error"]  # not retried
    assert len(app.records) == seen  # no request got through
    assert 'sluicegate_upstream_attempts_total{outcome="tls_error",upstream="tls"} 1.0' in metrics
    logged = [e for e in logs if e.get("error") == "upstream_tls_error"]
    assert logged
    assert "unable to get local issuer certificate" in logged[0]["message"]


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_ssl_cert_file_and_dir_are_still_honoured(
    tmp_path: Path,
    pki: Pki,
    https_mock: tuple[MockUpstream, RunningServer],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    _, upstream = https_mock
    trusted = str(pki.ca)
    if variable == "SSL_CERT_DIR":  # a directory of CA certificates named by subject hash
        trusted = str(tmp_path / "certs")
        Path(trusted).mkdir()
        shutil.copy(pki.ca, trusted)
        subprocess.run(["openssl", "rehash", trusted], check=True, capture_output=True)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv(variable, trusted)
    with _proxy(tmp_path, upstream.url, None, []) as proxy:
        assert _post(proxy.url, "bot").status_code == 200


def test_verify_false_works_and_warns(
    tmp_path: Path, https_mock: tuple[MockUpstream, RunningServer]
) -> None:
    _, upstream = https_mock
    with capture_logs() as logs, _proxy(tmp_path, upstream.url, {"verify": False}, []) as proxy:
        assert _post(proxy.url, "bot").status_code == 200
    warned = [str(e) for e in logs if "NOT checked" in str(e)]
    assert warned
    assert "upstreams.tls.tls.verify" in warned[0]


def test_mtls_works_with_a_client_certificate_and_fails_cleanly_without(
    tmp_path: Path, pki: Pki, mtls_mock: tuple[MockUpstream, RunningServer]
) -> None:
    _, upstream = mtls_mock
    client = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert)}
    with _proxy(tmp_path, upstream.url, {**client, "key_file": str(pki.client_key)}, []) as proxy:
        assert _post(proxy.url, "bot", stream=True).status_code == 200
    records: list[RequestRecord] = []
    with _proxy(tmp_path, upstream.url, {"ca_file": str(pki.ca)}, records) as proxy:
        answer = _post(proxy.url, "bot", stream=True)
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "upstream_error"
    assert "'tls'" in answer.json()["error"]["message"]
    # This server closes without its TLS alert, so the proxy sees a bare reset; one that sends
    # the alert: test_an_upstream_refusing_the_client_certificate_is_one_attempt_and_a_tls_502
    assert records[0].attempts  # answered as a failed attempt, not a crash


@contextmanager
def _refusing_upstream(pki: Pki, client_ca: Path) -> Iterator[tuple[str, list[str]]]:
    """An mTLS upstream as nginx, Go or OpenSSL servers are one (the asyncio server behind
    `mtls_mock` closes without sending its alert): it wants a client certificate signed by
    `client_ca`, and refuses any other with a TLS alert. Its URL, and the reason for each
    connection it refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    refused: list[str] = []

    def serve(listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                try:
                    context.wrap_socket(connection, server_side=True).close()
                except ssl.SSLError as exc:
                    refused.append(exc.reason or "")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        yield f"https://127.0.0.1:{listener.getsockname()[1]}", refused
        listener.shutdown(socket.SHUT_RDWR)
    thread.join(5)


@pytest.mark.parametrize(
    ("trusted", "client_cert", "alert"),
    [
        ("ca", False, "tlsv13 alert certificate required"),
        ("other_ca", True, "tlsv1 alert unknown ca"),
    ],
    ids=["no-certificate", "untrusted-certificate"],
)
def test_an_upstream_refusing_the_client_certificate_is_one_attempt_and_a_tls_502(
    tmp_path: Path, pki: Pki, trusted: str, client_cert: bool, alert: str
) -> None:
    tls = {"ca_file": str(pki.ca)}
    if client_cert:
        tls |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    records: list[RequestRecord] = []
    with (
        _refusing_upstream(pki, getattr(pki, trusted)) as (url, refused),
        capture_logs() as logs,
        _proxy(tmp_path, url, tls, records) as proxy,
    ):
        answer = _post(proxy.url, "bot", stream=True)
        metrics = httpx.get(proxy.url + "/metrics").text
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "upstream_tls_error"
    refusal = f"upstream 'tls' refused the connection's client certificate: {alert}"
    assert error["message"] == refusal
    assert [a.outcome for a in records[0].attempts] == ["tls_error"]  # not retried
    assert len(refused) == 1  # one connection, one refusal
    assert 'sluicegate_upstream_attempts_total{outcome="tls_error",upstream="tls"} 1.0' in metrics
    assert [e["message"] for e in logs if e.get("error") == "upstream_tls_error"] == [refusal]


def test_sequential_requests_reuse_one_tls_connection(
    tmp_path: Path, pki: Pki, https_mock: tuple[MockUpstream, RunningServer]
) -> None:
    app, upstream = https_mock
    seen = len(app.records)
    with _proxy(tmp_path, upstream.url, {"ca_file": str(pki.ca)}, []) as proxy:
        for stream in (True, False) * 3:
            assert _post(proxy.url, "bot", stream=stream).status_code == 200
    peers = {record.peer for record in app.records[seen:]}
    assert len(app.records) - seen == 6
    assert len(peers) == 1  # one connection, so one handshake


_ROUTE = "routes: [{model: m, targets: [{upstream: up, model: m}]}]\n"


def _issues(tls: str, tmp_path: Path, base_url: str = "https://up") -> list[str]:
    text = f"upstreams:\n  up:\n    base_url: {base_url}\n    tls: {tls}\n{_ROUTE}"
    try:
        config = parse_config(text, "routes.yaml", {})
    except ConfigError as exc:
        return [str(issue) for issue in exc.issues]
    return [f"warning: {w}" for w in config.warnings]


def test_tls_config_checks(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    (tmp_path / "junk.pem").write_text("not a certificate")
    table = [
        (f"{{ca_file: {pki.ca}}}", []),
        (
            f"{{ca_file: {missing}}}",
            [f"routes.yaml:4: upstreams.up.tls.ca_file: no such file '{missing}'"],
        ),
        (f"{{ca_file: {tmp_path / 'junk.pem'}}}", ["upstreams.up.tls.ca_file: expected PEM"]),
        (f"{{key_file: {pki.client_key}}}", ["upstreams.up.tls.key_file: needs tls.cert_file"]),
        (f"{{cert_file: {pki.client_cert}}}", ["upstreams.up.tls.cert_file: expected PEM"]),
        ("{verify: 'no'}", ["upstreams.up.tls.verify: expected true or false"]),
        ("{verify: false}", ["warning: routes.yaml:4: upstreams.up.tls.verify: false: the"]),
        ("{vrify: true}", ["upstreams.up.tls.vrify: unknown key 'vrify' (did you mean 'verify'"]),
    ]
    for tls, expected in table:
        got = _issues(tls, tmp_path)
        assert len(got) == len(expected), (tls, got)
        for line, want in zip(got, expected, strict=True):
            assert want in line, (tls, got)
    plain = _issues(f"{{ca_file: {pki.ca}}}", tmp_path, "http://up")
    assert plain == ["warning: routes.yaml:4: upstreams.up.tls: applies to https:// upstreams "
                     "only; base_url is not one"]  # fmt: skip


def test_check_warns_about_verify_false(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.format(url="https://far.example", tls="    tls: {verify: false}"))
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"warning: {path}:4: upstreams.tls.tls.verify: false: the upstream")
    assert out.out.startswith("ok: ")


def test_https_to_a_plain_http_upstream_is_a_tls_failure_named_as_such(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    records: list[RequestRecord] = []
    https = mock_server.url.replace("http://", "https://")
    with _proxy(tmp_path, https, None, records) as proxy:
        answer = _post(proxy.url, "bot")
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_tls_error"
    message = answer.json()["error"]["message"]
    assert message == "the TLS handshake with upstream 'tls' failed: wrong version number"
    assert [a.outcome for a in records[0].attempts] == ["tls_error"]
