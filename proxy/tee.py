"""The metering tee on the relay: watches the bytes for usage, and touches them only where
the proxy's own stream_options handling requires it (pure, no I/O).

Three cases, decided once per request when its answer commits:
- the stream will carry usage the client asked for: watch for it (a cheap marker scan);
- the proxy added `include_usage` for its own metering: take that usage event out again;
- the upstream cannot send usage (stream_options stripped, or passed without it): collect
  the text for a token estimate, and if the client asked for usage, add one usage chunk
  before `data: [DONE]`: the only bytes the proxy ever adds to an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from proxy.metering import UsageEventFinder, usage_from_json
from proxy.record import Usage
from proxy.sse import ContentCollector, UsageEventDropper, usage_chunk

TeeMode = Literal["watch", "drop", "collect"]
_DONE = b"data: [DONE]"


class Tee:
    __slots__ = ("_collector", "_dropper", "_finder", "_synth", "_template", "mode")

    def __init__(
        self,
        mode: TeeMode,
        *,
        template: dict[str, Any] | None = None,
        synthesize: Callable[[str], dict[str, int]] | None = None,
    ) -> None:
        self.mode = mode
        self._finder = UsageEventFinder() if mode == "watch" else None
        self._dropper = UsageEventDropper() if mode == "drop" else None
        self._collector = ContentCollector() if mode == "collect" else None
        self._template = template or {}
        self._synth = synthesize  # completion text → usage dict, for the added chunk

    def feed(self, chunk: bytes) -> bytes:
        if self._finder is not None:
            self._finder.feed(chunk)
            return chunk
        if self._dropper is not None:
            return self._dropper.feed(chunk)
        assert self._collector is not None
        self._collector.feed(chunk)
        if self._synth is not None and (i := chunk.find(_DONE)) >= 0:
            added = usage_chunk(self._template, self._synth(self._collector.text))
            self._synth = None
            return chunk[:i] + added + chunk[i:]
        return chunk

    def end(self) -> bytes:
        """Bytes still held when the upstream stream ends."""
        if self._finder is not None:
            self._finder.flush()
        return self._dropper.flush() if self._dropper is not None else b""

    def usage(self) -> Usage | None:
        """Usage the stream itself reported, if any."""
        if self._finder is not None:
            return self._finder.usage
        raw = self._dropper.usage if self._dropper is not None else None
        if raw is None and self._collector is not None:
            raw = self._collector.usage
        return usage_from_json(raw) if raw is not None else None

    @property
    def text(self) -> str:
        return self._collector.text if self._collector is not None else ""
