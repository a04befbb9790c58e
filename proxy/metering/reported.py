"""Usage the upstream reported: its usage object (JSON body or the SSE event carrying it) or
configured response headers, as non-overlapping counts (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.record import Usage, UsageSource


def _count(obj: Any, *keys: str) -> int | None:
    """The first key holding a JSON integer, clamped at 0; None when none does."""
    if not isinstance(obj, Mapping):
        return None
    for key in keys:
        value = obj.get(key)
        # bool is an int subclass, and `true` is no token count.
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)
    return None


def usage_from_json(usage: Mapping[str, Any], source: UsageSource = "reported") -> Usage:
    """OpenAI's usage object (and DeepSeek's cache fields, and the Responses API's names)
    as non-overlapping counts. Garbage in any part counts as 0; it never raises."""
    if not isinstance(usage, Mapping):
        return Usage(source=source)
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    cached = _count(prompt_details, "cached_tokens")
    if cached is None:
        cached = _count(usage, "prompt_cache_hit_tokens")
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    if prompt is None:  # DeepSeek's hit + miss add up to its prompt_tokens
        prompt = (cached or 0) + (_count(usage, "prompt_cache_miss_tokens") or 0)
    completion = _count(usage, "completion_tokens", "output_tokens") or 0
    # Details are parts of the totals; an upstream claiming more than the total is clamped
    # so that no type goes negative and the sum stays the reported total.
    cached = min(cached or 0, prompt)
    reasoning = min(_count(completion_details, "reasoning_tokens") or 0, completion)
    return Usage(
        input=prompt - cached,
        cached_input=cached,
        output=completion - reasoning,
        reasoning=reasoning,
        source=source,
    )


def _header_int(value: bytes) -> int | None:
    text = value.strip()
    return int(text) if text.isdigit() else None  # bytes.isdigit: ASCII digits only


def usage_from_headers(
    headers: Iterable[tuple[bytes, bytes]],
    prompt_header: str | None,
    completion_header: str | None,
) -> Usage | None:
    """Counts from response headers named in the config (lower-case names)."""
    wanted = {
        name.encode(): slot
        for name, slot in ((prompt_header, "prompt"), (completion_header, "completion"))
        if name
    }
    if not wanted:
        return None
    found: dict[str, int] = {}
    for name, value in headers:
        slot = wanted.get(name.lower())
        if slot is not None and slot not in found:
            number = _header_int(value)
            if number is not None:
                found[slot] = number
    if not found:
        return None
    return Usage(input=found.get("prompt", 0), output=found.get("completion", 0), source="header")
