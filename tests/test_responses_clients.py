"""Frameworks whose default is the Responses API, unchanged but for their base URL, through a
real proxy to the mock's native /v1/responses: openai-agents' `Runner.run` (with a function
tool round trip) and LangChain's `ChatOpenAI(use_responses_api=True)`."""

from __future__ import annotations

import asyncio

import agents
import openai
from langchain_openai import ChatOpenAI

from proxy.mock.upstream import MockUpstream, expected_content
from proxy.serving import RunningServer

CALLS: list[str] = []


@agents.function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    CALLS.append(city)
    return f"sunny in {city}"


def test_agents_runner_with_a_function_tool_round_trip(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    agents.set_tracing_disabled(True)  # no exporter: nothing leaves the machine
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)
    agent = agents.Agent(
        name="shop assistant",
        instructions="Answer about the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="support-bot", openai_client=client),
    )
    seen = len(mock_app.records)
    CALLS.clear()
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
    assert CALLS == ["mock"]  # the mock filled the tool's schema in
    assert result.final_output == expected_content(0, 16)
    bodies = [r.body for r in mock_app.records[seen:]]
    assert len(bodies) == 2
    outputs = [i for i in bodies[1]["input"] if i.get("type") == "function_call_output"]
    assert [o["output"] for o in outputs] == ["sunny in mock"]


def test_agents_default_client_uses_the_responses_api(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    """`set_default_openai_client` and a model given by name: the SDK's default path."""
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agent = agents.Agent(name="plain", instructions="Be brief.", model="support-bot")
    result = asyncio.run(agents.Runner.run(agent, "hi"))
    assert result.final_output == expected_content(0, 16)
    assert "input" in mock_app.records[-1].body  # a Responses API request, not chat's


def test_langchain_chat_openai_with_the_responses_api_invokes_and_streams(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    llm = ChatOpenAI(
        model="support-bot",
        base_url=proxy.url + "/v1",
        api_key="client-key",  # type: ignore[arg-type]
        use_responses_api=True,
        max_retries=0,
        extra_body={"seed": 13},
    )
    answer = llm.invoke("双十一预售什么时候开始?")
    assert answer.text == expected_content(13, 16)
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == 16
    streamed = "".join(chunk.text for chunk in llm.stream("双十一预售什么时候开始?"))
    assert streamed == expected_content(13, 16)
    assert "input" in mock_app.records[-1].body
