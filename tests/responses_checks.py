"""The Responses API as strict clients read it: every event of a stream validated with
openai-python's own types, and the invariants its accumulator and the Agents SDK lean on
checked (order, ids, indexes, sequence numbers, deltas adding up to the final output); the
Agents SDK's runner with a function tool; LangChain on the Responses API."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import openai
import orjson
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from langchain_openai import ChatOpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

EVENT = TypeAdapter(ResponseStreamEvent)
LIFECYCLE = (
    "response.created",
    "response.in_progress",
    "response.completed",
    "response.incomplete",
)
# delta event → (its done event, the done event's text field)
DELTAS = {
    "response.output_text.delta": ("response.output_text.done", "text"),
    "response.refusal.delta": ("response.refusal.done", "refusal"),
    "response.function_call_arguments.delta": (
        "response.function_call_arguments.done",
        "arguments",
    ),
    "response.reasoning_summary_text.delta": ("response.reasoning_summary_text.done", "text"),
}


def events_of(data: bytes) -> list[dict[str, Any]]:
    """The events of a stream the proxy wrote: `event: X` then one `data:` line, blank line."""
    assert data.endswith(b"\n\n")
    events = []
    for raw in data[:-2].split(b"\n\n"):
        name, payload = raw.split(b"\n")
        event = orjson.loads(payload.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        EVENT.validate_python(event)
        events.append(event)
    return events


def check_stream(events: list[dict[str, Any]]) -> Response | None:
    """Asserts the invariants; the final response (None for a stream ended by `error`)."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    response_id = events[0]["response"]["id"]
    assert response_id.startswith("resp_")
    ends = [e for e in events if e["type"] in LIFECYCLE[2:] or e["type"] == "error"]
    assert ends == [events[-1]], "one ending, last"
    added, done = _items(events)
    deltas: dict[tuple[str, int], list[str]] = defaultdict(list)
    for event in events:
        if event["type"] in LIFECYCLE:
            assert event["response"]["id"] == response_id
        if "item_id" in event:
            index = event["output_index"]
            assert added[index]["id"] == event["item_id"], "item_id agrees with output_index"
            assert index not in done or done[index][0] > events.index(event), "nothing after done"
        if event["type"] in DELTAS:
            deltas[(event["item_id"], event.get("content_index", 0))].append(event["delta"])
        for kind, field in DELTAS.values():
            if event["type"] == kind:
                key = (event["item_id"], event.get("content_index", 0))
                assert "".join(deltas[key]) == event[field], "deltas add up"
    if events[-1]["type"] == "error":
        return None
    response = Response.model_validate(events[-1]["response"])
    assert set(done) == set(added), "every item added is done"
    final = [done[index][1] for index in sorted(done)]
    assert events[-1]["response"]["output"] == final
    return response


def _items(events: list[dict[str, Any]]) -> tuple[dict[int, Any], dict[int, tuple[int, Any]]]:
    added: dict[int, Any] = {}
    done: dict[int, tuple[int, Any]] = {}
    for position, event in enumerate(events):
        index = event.get("output_index")
        if event["type"] == "response.output_item.added":
            assert index == len(added), "output indexes count up as items open"
            added[index] = event["item"]
        elif event["type"] == "response.output_item.done":
            assert event["item"]["id"] == added[index]["id"]
            assert index not in done
            done[index] = (position, event["item"])
    return added, done


def summary(response: Response) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for item in response.output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(s.text for s in item.summary), item.status))
        elif item.type == "message":
            out.append(
                (
                    "message",
                    [
                        (p.type, getattr(p, "text", None) or getattr(p, "refusal", None))
                        for p in item.content
                    ],
                    item.status,
                )
            )
        elif item.type == "function_call":
            out.append(("function_call", item.call_id, item.name, item.arguments, item.status))
    return out


# The tool of the round-trip tests: strict, so openai-python parses its arguments.
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def run_weather_agent(base_url: str, model: str, *, streamed: bool) -> Any:
    """The Agents SDK's `Runner.run` (or `run_streamed`, read to its end) with its default
    Responses model and one function tool, asking about the weather in Paris."""
    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="client-key", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=model, openai_client=client),
    )

    async def run() -> Any:
        async with client:
            if not streamed:
                return await Runner.run(agent, "Weather in Paris?")
            result = Runner.run_streamed(agent, "Weather in Paris?")
            async for _ in result.stream_events():
                pass
            return result

    return asyncio.run(run())


def langchain_on_responses(base_url: str, model: str) -> ChatOpenAI:
    """LangChain's ChatOpenAI with `use_responses_api=True`, pointed at the proxy."""
    key: Any = "client-key"  # its type is SecretStr; LangChain takes the string
    return ChatOpenAI(
        model=model, base_url=base_url + "/v1", api_key=key, use_responses_api=True, max_retries=0
    )
