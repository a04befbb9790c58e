"""Responses `input` (a string or a list of items) → chat completions `messages` (pure).

- message items: roles user, system, assistant; developer becomes system (chat-only servers
  know no developer role). Text parts (`input_text`, `output_text`, an assistant's `refusal`)
  join with newlines into one string; `input_image` becomes an `image_url` part.
- `function_call` items become `tool_calls` of one assistant message: consecutive calls (a
  parallel call) and the text just before them (one model turn) share it.
- `function_call_output` items become `tool` messages.
- `reasoning` items: their text goes back as `reasoning_content` on the assistant message that
  follows, when that message calls tools (DeepSeek's thinking mode requires it inside a tool
  loop, and ignores or refuses it elsewhere); otherwise, and when a reasoning item has no text
  (OpenAI's encrypted reasoning), it is left out: no chat upstream could read it.
Any other item or part type is refused with a 400 naming it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from proxy.errors import BadRequest, Untranslatable, clipped

T = TypeVar("T")
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_REFUSED_ITEMS = {"item_reference": "it refers to stored items, and a chat upstream stores none"}
_NAMES = {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}
MAX_QUOTED = 100  # characters of a client's value an error quotes: one request, one short line


def quoted(value: Any) -> str:
    """A client's value as an error message quotes it: its repr, clipped."""
    return clipped(repr(value), MAX_QUOTED)


def expect(value: Any, kind: type[T], param: str) -> T:
    """`value` if it has the JSON type `kind`, else a 400 naming `param`."""
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise BadRequest(f"'{param}' must be {_NAMES.get(kind, kind.__name__)}", param=param)


def chat_messages(value: Any, instructions: str) -> list[dict[str, Any]]:
    messages = _Messages()
    if instructions:
        messages.out.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        messages.out.append({"role": "user", "content": value})
        return messages.out
    for index, item in enumerate(expect(value, list, "input")):
        messages.add(expect(item, dict, f"input[{index}]"), f"input[{index}]")
    return messages.finish()


class _Messages:
    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self._reasoning = ""  # a reasoning item's text, for the assistant message after it

    def add(self, item: dict[str, Any], param: str) -> None:
        kind = item.get("type", "message")
        if kind == "reasoning":
            self._reasoning = _reasoning_text(item)
            return
        if kind == "message":
            self._message(item, param)
        elif kind == "function_call":
            self._function_call(item, param)
        elif kind == "function_call_output":
            self._function_output(item, param)
        else:
            reason = _REFUSED_ITEMS.get(kind, "only messages and function calls translate")
            message = (
                f"{param}: item type {quoted(kind)} is not supported by this upstream: {reason}"
            )
            raise Untranslatable(message, param=f"{param}.type")
        self._reasoning = ""

    def finish(self) -> list[dict[str, Any]]:
        for message in self.out:
            if "reasoning_content" in message and not message.get("tool_calls"):
                del message["reasoning_content"]
        return self.out

    def _message(self, item: dict[str, Any], param: str) -> None:
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            roles = ", ".join(_ROLES)
            raise BadRequest(f"'{param}.role' must be one of {roles}", param=f"{param}.role")
        content = _content(item.get("content"), f"{param}.content", role)
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and self._reasoning:
            message["reasoning_content"] = self._reasoning
        self.out.append(message)

    def _function_call(self, item: dict[str, Any], param: str) -> None:
        call = {
            "id": expect(item.get("call_id"), str, f"{param}.call_id"),
            "type": "function",
            "function": {
                "name": expect(item.get("name"), str, f"{param}.name"),
                "arguments": expect(item.get("arguments"), str, f"{param}.arguments"),
            },
        }
        last = self.out[-1] if self.out else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            self.out.append(last)
        if self._reasoning:
            last.setdefault("reasoning_content", self._reasoning)
        last.setdefault("tool_calls", []).append(call)

    def _function_output(self, item: dict[str, Any], param: str) -> None:
        call_id = expect(item.get("call_id"), str, f"{param}.call_id")
        output = _content(item.get("output"), f"{param}.output", "tool")
        self.out.append({"role": "tool", "tool_call_id": call_id, "content": output})


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = [*(item.get("summary") or ()), *(item.get("content") or ())]
    return "\n".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _content(content: Any, param: str, role: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts = [
        _part(expect(p, dict, f"{param}[{i}]"), f"{param}[{i}]", role)
        for i, p in enumerate(expect(content, list, param))
    ]
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _part(part: dict[str, Any], param: str, role: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        key = "refusal" if kind == "refusal" else "text"
        return {"type": "text", "text": expect(part.get(key), str, f"{param}.{key}")}
    if kind == "input_image" and role == "user":
        url = part.get("image_url")
        if not isinstance(url, str):
            message = f"{param}: images by file_id need OpenAI's file store: send image_url"
            raise Untranslatable(message, param=f"{param}.file_id")
        image = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    message = f"{param}: content type {quoted(kind)} is not supported by this upstream"
    raise Untranslatable(message, param=f"{param}.type")
