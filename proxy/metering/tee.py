"""The metering tee on the relay: watches the bytes for usage, and touches them only where
the proxy's own stream_options handling requires it (pure, no I/O).

Three modes, decided once per request when its answer commits:
- watch: the stream will carry usage the client asked for: a cheap marker scan finds it;
- drop: the proxy added `include_usage` for its own metering: that usage event is taken out;
- collect: the upstream will not report usage (stream_options stripped, or passed without
  it): every event is parsed for the text of a token estimate and, if the client asked for
  usage, one usage chunk is added before `data: [DONE]` (everything the proxy removes from
  or adds to a stream is listed once, in docs/BEHAVIOUR.md). Only then are incomplete events
  held back, so the chunk lands between whole events; otherwise each chunk is relayed as it
  comes and parsed on the side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from proxy.metering.reported import usage_from_json
from proxy.metering.scan import UsageEventFinder
from proxy.record import Usage
from proxy.sse import ContentCollector, UsageEventDropper, split_complete, usage_chunk

TeeMode = Literal["watch", "drop", "collect"]


class Tee:
    __slots__ = (
        "_collector",
        "_dropper",
        "_events",
        "_finder",
        "_held",
        "_synth",
        "_template",
        "feed",
        "mode",
    )

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
        self._held = b""
        self._template = template or {}
        self._synth = synthesize  # completion text → usage dict, for the added chunk
        self._events = 0
        # The bytes to relay for each chunk: bound once, so the hot loop calls one function.
        self.feed: Callable[[bytes], bytes] = (
            self._watch
            if self._finder is not None
            else self._dropper.feed
            if self._dropper is not None
            else self._collect
        )

    @property
    def events(self) -> int:
        """`data:` lines seen in watch/drop mode: a cut stream's only measure."""
        return self._dropper.events if self._dropper is not None else self._events

    def _watch(self, chunk: bytes) -> bytes:
        assert self._finder is not None
        self._events += chunk.count(b"data:")
        self._finder.feed(chunk)
        return chunk

    def _collect(self, chunk: bytes) -> bytes:
        collector = self._collector
        assert collector is not None
        if self._synth is None:  # nothing to add to this stream: relay it as it comes
            collector.feed(chunk)
            return chunk
        data = self._held + chunk if self._held else chunk
        events, end = split_complete(data)
        self._held = data[end:]
        out: list[bytes] = []
        for event, ending in events:
            collector.observe(event)
            if collector.done and self._synth is not None:
                out.append(usage_chunk(self._template, self._synth(collector.text)))
                self._synth = None
            out.append(event + ending)
        return b"".join(out)

    def end(self) -> bytes:
        """Bytes still held when the upstream stream ends."""
        if self._finder is not None:
            self._finder.flush()
            return b""
        if self._dropper is not None:
            return self._dropper.flush()
        held, self._held = self._held, b""  # (empty once the usage chunk has been added)
        return held

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
