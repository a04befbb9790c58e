"""GET/DELETE /v1/responses/{id}, .../input_items and .../cancel go back to the upstream that
created the response, with its key; `previous_response_id` is routed there too; an id the
proxy does not know (or another client key made) is a 404 that says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.admission import hash_key
from proxy.app import create_app
from proxy.mock.upstream import MockUpstream
from proxy.serving import RunningServer

KEY_A, KEY_B = "sk-client-a-0123456789", "sk-client-b-0123456789"
UP_KEY_ONE, UP_KEY_TWO = "sk-up-one-9f3c1e7a01234567", "sk-up-two-9f3c1e7a01234567"

ROUTES = f"""\
upstreams:
  one: {{{{base_url: "{{one}}/v1", api_key: {UP_KEY_ONE}}}}}
  two: {{{{base_url: "{{two}}/v1", api_key: {UP_KEY_TWO}}}}}
routes:
  - model: bot-one
    targets: [{{{{upstream: one, model: m1}}}}]
  - model: bot-two
    targets: [{{{{upstream: two, model: m2}}}}]
  - model: either
    strategy: least_inflight
    targets: [{{{{upstream: one, model: m1}}}}, {{{{upstream: two, model: m2}}}}]
keys:
  a: {{{{sha256: {hash_key(KEY_A)}}}}}
  b: {{{{sha256: {hash_key(KEY_B)}}}}}
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[MockUpstream, MockUpstream, str, str]]:
    one, two = MockUpstream(), MockUpstream()
    with RunningServer(one) as s1, RunningServer(two) as s2:
        yield one, two, s1.url, s2.url


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream, str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    path = Path(tmp_path_factory.mktemp("retrieval")) / "routes.yaml"
    path.write_text(ROUTES.format(one=upstreams[2], two=upstreams[3]))
    with RunningServer(create_app(path)) as server:
        yield server


def _client(proxy: RunningServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def test_retrieval_goes_to_the_upstream_that_created_it(
    proxy: RunningServer, upstreams: tuple[MockUpstream, MockUpstream, str, str]
) -> None:
    one, two = upstreams[0], upstreams[1]
    client = _client(proxy)
    made_one = client.responses.create(model="bot-one", input="first")
    made_two = client.responses.create(model="bot-two", input="second")
    assert made_one.id != made_two.id
    got = client.responses.retrieve(made_two.id)
    assert got.id == made_two.id
    assert got.output_text == made_two.output_text
    items = client.responses.input_items.list(made_one.id)
    assert [item.type for item in items.data] == ["message"]
    method, path, auth = one.stored.calls[-1]
    assert (method, path) == ("GET", f"/v1/responses/{made_one.id}/input_items")
    assert auth == f"Bearer {UP_KEY_ONE}"  # that upstream's key; the client's never
    assert two.stored.calls[-1][:2] == ("GET", f"/v1/responses/{made_two.id}")
    assert two.stored.calls[-1][2] == f"Bearer {UP_KEY_TWO}"


def test_a_streamed_response_is_known_by_its_created_event(proxy: RunningServer) -> None:
    client = _client(proxy)
    with client.responses.stream(model="bot-two", input="streamed") as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_delete_forgets_it_and_cancel_is_relayed(proxy: RunningServer) -> None:
    client = _client(proxy)
    made = client.responses.create(model="bot-one", input="to delete")
    assert client.responses.cancel(made.id).status == "cancelled"
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(made.id)
    assert "was not created through this proxy, or its record expired" in caught.value.message


def test_an_unknown_id_is_a_404_that_says_why(proxy: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(proxy).responses.retrieve("resp_x")
    assert caught.value.body == {
        "message": "response 'resp_x' was not created through this proxy, or its record expired",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


def test_another_client_key_cannot_read_it(proxy: RunningServer) -> None:
    made = _client(proxy, KEY_A).responses.create(model="bot-one", input="private")
    with pytest.raises(openai.NotFoundError):
        _client(proxy, KEY_B).responses.retrieve(made.id)


def test_previous_response_id_goes_to_the_upstream_that_holds_it(
    proxy: RunningServer, upstreams: tuple[MockUpstream, MockUpstream, str, str]
) -> None:
    """Each mock answers 400 for a previous_response_id it does not hold."""
    client = _client(proxy)
    first = client.responses.create(model="bot-two", input="remember me")
    for _ in range(4):  # least_inflight would spread them over both upstreams
        follow = client.responses.create(
            model="either", input="and now?", previous_response_id=first.id
        )
        assert follow.previous_response_id == first.id
        assert follow.model == "m2"


def test_wrong_method_and_bad_ids_are_refused(proxy: RunningServer) -> None:
    auth = {"authorization": f"Bearer {KEY_A}"}
    bad = httpx.get(proxy.url + "/v1/responses/a%20b", headers=auth, timeout=5)
    assert bad.status_code == 404
    assert bad.json()["error"]["code"] == "not_found"
    put = httpx.put(proxy.url + "/v1/responses/resp_x", headers=auth, timeout=5)
    assert put.status_code == 405
    assert httpx.get(proxy.url + "/v1/responses/resp_x", timeout=5).status_code == 401


def test_the_upstreams_own_error_is_relayed(
    proxy: RunningServer, upstreams: tuple[MockUpstream, MockUpstream, str, str]
) -> None:
    """Known to the proxy but gone upstream (deleted there directly): the upstream's 404."""
    client = _client(proxy)
    made = client.responses.create(model="bot-one", input="gone upstream")
    direct = httpx.delete(f"{upstreams[2]}/v1/responses/{made.id}", timeout=5)
    assert direct.status_code == 200
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(made.id)
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": f"Response with id '{made.id}' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
