"""The client's chat request: validated just enough to route it (pure).

The body is forwarded with only `model` replaced (and `stream_options` adjusted, see
`upstream_body`); every other field, known or not, travels unchanged so new OpenAI
parameters work without a proxy release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.errors import BadRequest

# pass: as the client sent it; strip: without stream_options; inject: ask for usage too.
StreamOptionsAction = Literal["pass", "strip", "inject"]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    stream: bool
    payload: dict[str, Any]

    @property
    def wants_usage(self) -> bool:
        """The client asked for the usage chunk of a stream."""
        options = self.payload.get("stream_options")
        return self.stream and isinstance(options, dict) and options.get("include_usage") is True

    def upstream_body(self, model: str, action: StreamOptionsAction = "pass") -> bytes:
        """The body for one upstream attempt: the client's, with the target's model name."""
        body = {**self.payload, "model": model}
        if action == "strip":
            body.pop("stream_options", None)
        elif action == "inject" and self.stream and not self.wants_usage:
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return orjson.dumps(body)


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter (a string)", param="model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    return ChatRequest(model=model, stream=stream, payload=payload)
