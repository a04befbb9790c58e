"""The paths clients reach the API by: `GET /v1/models/{model}` (`client.models.retrieve`),
and every path again without `/v1`, for a `base_url` that lacks it; the real openai SDK."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from proxy.api_request import APIS
from proxy.app import create_app
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer

WIDE, NARROW = "sk-wide-4c1d9e7f0a2b", "sk-narrow-8e3f1a6c5d0b"
ROUTES = """\
upstreams:
  mock: {{base_url: '{url}/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
  - {{model: openai/gpt-4o-mini, targets: [{{upstream: mock, model: mock-chat}}]}}
  - {{model: embedder, targets: [{{upstream: mock, model: mock-embed}}]}}
pricing:
  mock-chat: {{input: 0.28, output: 0.42}}
keys:
  wide: {{sha256: {wide}}}
  narrow: {{sha256: {narrow}, models: [support-bot]}}
"""


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RunningServer(MockUpstream()) as upstream:
        path = tmp_path_factory.mktemp("paths") / "routes.yaml"
        path.write_text(ROUTES.format(url=upstream.url, wide=_sha(WIDE), narrow=_sha(NARROW)))
        with RunningServer(create_app(path, env={}, watch_interval=None)) as proxy:
            yield proxy.url


@contextmanager
def _client(base_url: str, key: str = WIDE) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_retrieve_answers_the_entry_the_list_has(proxy_url: str, prefix: str) -> None:
    with _client(proxy_url + prefix) as client:
        _retrieve_matches_list(client)


def _retrieve_matches_list(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    for name in ("support-bot", "openai/gpt-4o-mini"):  # the SDK sends the `/` as %2F
        model = client.models.retrieve(name)
        assert model == listed[name]
        assert model.model_extra == {"pricing": {"mock-chat": {
            "input": 0.28, "cached_input": 0.28, "output": 0.42}}}  # fmt: skip


def test_retrieve_of_an_unknown_or_forbidden_model_is_404_model_not_found(proxy_url: str) -> None:
    cases = [(WIDE, "no-such-model"), (NARROW, "openai/gpt-4o-mini"), (WIDE, "support-bot/x")]
    for key, name in cases:
        with _client(proxy_url + "/v1", key) as client, pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(name)
        assert info.value.code == "model_not_found"
        assert f"The model '{name}' does not exist" in info.value.message
    with _client(proxy_url, "sk-unknown") as client, pytest.raises(openai.AuthenticationError):
        client.models.retrieve("support-bot")


def test_escapes_elsewhere_still_reach_no_path(proxy_url: str) -> None:
    for path in ("/%761/models", "/v1/%6dodels/support-bot", "/%6dodels/support-bot"):
        response = httpx.get(proxy_url + path, headers={"authorization": f"Bearer {WIDE}"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_a_base_url_without_v1_serves_every_api(proxy_url: str) -> None:
    with _client(proxy_url) as client:  # no /v1: the SDK posts to /chat/completions
        _every_api(client)


def _every_api(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="support-bot", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="support-bot", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    completion = client.completions.create(model="support-bot", prompt="hi")
    assert completion.choices[0].text
    embedding = client.embeddings.create(model="embedder", input="hi")
    assert embedding.data[0].embedding


def test_every_api_path_is_served_without_v1_too(proxy_url: str) -> None:
    headers = {"authorization": f"Bearer {WIDE}"}
    for path in APIS:
        short = path.removeprefix("/v1")
        assert short != path
        response = httpx.post(proxy_url + short, json={}, headers=headers)
        assert response.status_code == 400  # reached the API: the body is what is wrong
        assert response.json()["error"]["type"] == "invalid_request_error"
