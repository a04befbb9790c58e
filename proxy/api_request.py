"""The client's request to one of the generation APIs (chat, completions, embeddings,
responses): validated just enough to route it (pure).

The body is forwarded with only `model` replaced (and `stream_options` adjusted, see
`upstream_body`); every other field, known or not, travels unchanged so new OpenAI
parameters work without a proxy release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from proxy.errors import BadRequest

# pass: as the client sent it; strip: without stream_options; inject: ask for usage too.
StreamOptionsAction = Literal["pass", "strip", "inject"]
# orjson reads JSON nested up to 1023 levels but writes at most this many, and every attempt
# re-serialises the body: deeper bodies are refused when first written (`upstream_body`),
# before any attempt, not with a 500.
MAX_DEPTH = 254


@dataclass(frozen=True, slots=True)
class Api:
    """One OpenAI endpoint the proxy routes: where it lives upstream, and the request field
    that holds the prompt (what an offline estimate counts)."""

    name: str  # as in the access log: chat, completions, embeddings, responses
    path: str  # below an upstream's base_url
    prompt_field: str
    streams: bool  # the API has `stream`; embeddings do not
    stream_options: bool = True  # a stream reports usage only when asked (not: responses)


CHAT = Api("chat", "/chat/completions", "messages", streams=True)
COMPLETIONS = Api("completions", "/completions", "prompt", streams=True)
EMBEDDINGS = Api("embeddings", "/embeddings", "input", streams=False)
# Usage always comes with `response.completed`; `stream_options` does not exist there.
RESPONSES = Api("responses", "/responses", "input", streams=True, stream_options=False)
APIS = {"/v1" + api.path: api for api in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)}


@dataclass(frozen=True, slots=True)
class ApiRequest:
    model: str
    stream: bool
    payload: dict[str, Any]
    api: Api = CHAT
    # Each attempt's body by (model, stream_options action): retries and the first check
    # (`Attempts.run`) reuse it.
    _bodies: dict[tuple[str, str], bytes] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @property
    def prompt(self) -> Any:
        """What an offline estimate counts: for the Responses API, `instructions` and `input`
        as chat messages (an input string is one user message)."""
        prompt = self.payload.get(self.api.prompt_field)
        if self.api is not RESPONSES:
            return prompt
        messages = prompt if isinstance(prompt, list) else []
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        instructions = self.payload.get("instructions")
        if isinstance(instructions, str):
            return [{"role": "system", "content": instructions}, *messages]
        return messages

    @property
    def counts_messages(self) -> bool:
        """`prompt` is a list of chat messages (chat, responses), for `estimate_usage`."""
        return self.api is CHAT or self.api is RESPONSES

    @property
    def wants_usage(self) -> bool:
        """The client asked for the usage chunk of a stream."""
        options = self.payload.get("stream_options")
        return self.stream and isinstance(options, dict) and options.get("include_usage") is True

    def upstream_body(self, model: str, action: StreamOptionsAction = "pass") -> bytes:
        """The body for one upstream attempt: the client's, with the target's model name."""
        kept = self._bodies.get((model, action))
        if kept is None:
            kept = self._bodies[model, action] = self._write(model, action)
        return kept

    def _write(self, model: str, action: StreamOptionsAction) -> bytes:
        body = {**self.payload, "model": model}
        if not self.api.stream_options:
            return orjson.dumps(body)  # the client's own body, whatever `action` says
        if action == "strip":
            body.pop("stream_options", None)
        elif action == "inject" and self.stream and not self.wants_usage:
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:  # the one thing a parsed body can fail at: depth
            message = f"request body is nested more than {MAX_DEPTH} levels deep"
            raise BadRequest(message, code="invalid_json") from None


def parse_request(body: bytes, api: Api = CHAT) -> ApiRequest:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter (a string)", param="model")
    field = api.prompt_field
    prompt = payload.get(field)
    if api is CHAT:
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("'messages' must be a non-empty array", param=field)
    elif api is RESPONSES:  # `input` may be left out (a `prompt` template, say)
        if prompt is not None and not isinstance(prompt, str | list):
            raise BadRequest("'input' must be a string or an array", param=field)
    elif not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
        raise BadRequest(f"'{field}' must be a string or a non-empty array", param=field)
    stream = payload.get("stream", False) if api.streams else False
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    return ApiRequest(model=model, stream=stream, payload=payload, api=api)
