"""With `state.url`, a response created through one proxy is retrieved through another: the
owner is in Redis. Two proxies (each its own app state, as two processes have) share one
real redis-server; with Redis gone, each knows only its own, and the 404 says so."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from proxy.app import create_app
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer
from tests.helpers import wait_for
from tests.redis_server import RedisServer

PASSWORD = "owners-" + secrets.token_urlsafe(16)
ROUTES = """\
state: {{url: '${{REDIS_URL}}', timeout: 1.0}}
upstreams:
  one: {{base_url: '{one}/v1'}}
  two: {{base_url: '{two}/v1'}}
routes:
  - {{model: bot-one, targets: [{{upstream: one, model: m1}}]}}
  - {{model: bot-two, targets: [{{upstream: two, model: m2}}]}}
"""


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, MockUpstream, RunningServer, RunningServer]]:
    path = Path(tmp_path_factory.mktemp("owners")) / "routes.yaml"
    one, two = MockUpstream(), MockUpstream()
    with (
        RedisServer(PASSWORD) as redis_server,
        RunningServer(one) as s1,
        RunningServer(two) as s2,
    ):
        path.write_text(ROUTES.format(one=s1.url, two=s2.url))
        env = {"REDIS_URL": redis_server.url}
        with (
            RunningServer(create_app(path, env=env)) as first,
            RunningServer(create_app(path, env=env)) as second,
        ):
            yield redis_server, two, first, second


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_made_through_one_proxy_retrieved_through_another(
    fleet: tuple[RedisServer, MockUpstream, RunningServer, RunningServer],
) -> None:
    redis_server, two, first, second = fleet
    made = _client(first).responses.create(model="bot-two", input="shared")
    key = f"sluicegate:responses:{made.id}"
    with redis_server.client() as client:
        assert wait_for(lambda: client.get(key) is not None, 5)
        assert 0 < client.ttl(key) <= 30 * 24 * 3600
    got = _client(second).responses.retrieve(made.id)
    assert got.output_text == made.output_text
    assert two.stored.calls[-1][:2] == ("GET", f"/v1/responses/{made.id}")
    _client(second).responses.delete(made.id)
    with redis_server.client() as client:
        assert wait_for(lambda: client.get(key) is None, 5)
    with pytest.raises(openai.NotFoundError):
        _client(first).responses.retrieve(made.id)


def test_with_redis_down_each_proxy_knows_its_own_and_says_so(
    fleet: tuple[RedisServer, MockUpstream, RunningServer, RunningServer],
) -> None:
    redis_server, _, first, second = fleet
    made = _client(first).responses.create(model="bot-one", input="before the outage")
    redis_server.kill()
    try:
        assert _client(first).responses.retrieve(made.id).id == made.id  # its own record
        with pytest.raises(openai.NotFoundError) as caught:
            _client(second).responses.retrieve(made.id)
        assert "the fleet's state store could not be reached" in caught.value.body["message"]  # type: ignore[index]
    finally:
        redis_server.start()
