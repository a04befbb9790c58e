"""The openai SDK, sync and async, stream and not: the same answer through the proxy as direct."""

from __future__ import annotations

import asyncio

import openai
import pytest

from proxy.mock.upstream import expected_content
from proxy.serving import RunningServer

MESSAGES = [{"role": "user", "content": "双十一预售什么时候开始?"}]


def _clients(proxy: RunningServer, mock: RunningServer) -> tuple[openai.OpenAI, openai.OpenAI]:
    via = openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)
    direct = openai.OpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0)
    return via, direct


def test_non_stream_matches_direct(proxy: RunningServer, mock_server: RunningServer) -> None:
    via, direct = _clients(proxy, mock_server)
    got = via.chat.completions.create(model="support-bot", messages=MESSAGES, seed=7)  # type: ignore[arg-type]
    want = direct.chat.completions.create(model="mock-chat", messages=MESSAGES, seed=7)  # type: ignore[arg-type]
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].message.content == expected_content(7, 16)
    assert got.usage == want.usage
    assert got.model == "mock-chat"  # the model that answered, as the upstream said


def test_stream_matches_direct(proxy: RunningServer, mock_server: RunningServer) -> None:
    via, direct = _clients(proxy, mock_server)

    def collect(client: openai.OpenAI, model: str) -> tuple[str, object]:
        text, usage = [], None
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        return "".join(text), usage

    got = collect(via, "support-bot")
    assert got == collect(direct, "mock-chat")
    assert got[0] == expected_content(11, 16)
    assert got[1] is not None


def test_async_client_stream_and_non_stream(
    proxy: RunningServer, mock_server: RunningServer
) -> None:
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        async with client:
            whole = await client.chat.completions.create(
                model="support-bot",
                messages=MESSAGES,
                seed=3,  # type: ignore[arg-type]
            )
            parts = []
            stream = await client.chat.completions.create(
                model="support-bot",
                messages=MESSAGES,
                seed=3,
                stream=True,  # type: ignore[arg-type]
            )
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
        return whole.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed == expected_content(3, 16)


@pytest.mark.parametrize("concurrency", [20])
def test_concurrent_async_streams_each_get_their_own_answer(
    proxy: RunningServer, concurrency: int
) -> None:
    async def one(client: openai.AsyncOpenAI, seed: int) -> str:
        stream = await client.chat.completions.create(
            model="support-bot",
            messages=MESSAGES,
            seed=seed,
            stream=True,  # type: ignore[arg-type]
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, s) for s in range(concurrency)))

    assert asyncio.run(run()) == [expected_content(s, 16) for s in range(concurrency)]


def test_models_lists_route_names(proxy: RunningServer) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["nowhere", "support-bot", "verbatim"]
