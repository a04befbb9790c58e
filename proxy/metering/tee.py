"""The metering tee on the relay: one small strategy per way of metering a stream, chosen once
per request when its answer commits (`usage.tee_for`), all with the interface of `Tee`:

- `Watch`: the stream will carry usage the client asked for: a cheap marker scan finds it
  (`WatchResponses`: the Responses API, whose streams always end with their usage);
- `Drop`: the proxy added `include_usage` for its own metering: that usage event is taken out;
- `Collect`: the upstream will not report usage (stream_options stripped, or passed without
  it): every event is parsed for the text of a token estimate, each chunk relayed as it comes;
- `CollectAddingUsage`: as `Collect`, for a client that asked for usage the upstream will not
  send: one usage chunk is added before `data: [DONE]` (everything the proxy removes from or
  adds to a stream is listed once, in docs/BEHAVIOUR.md). Unlike `Collect`, it holds
  incomplete events back, so the chunk lands between whole events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from proxy.metering.reported import usage_from_json
from proxy.metering.scan import ContentCollector, UsageEventDropper, UsageEventFinder
from proxy.record import Usage
from proxy.sse import EventBuffer, usage_chunk


class Tee(ABC):
    """What the relay calls for each chunk, and what metering asks once the stream ended.

    `feed(chunk)`, the bytes to relay for this chunk, is the strategy's reader itself: one
    bound call per chunk, no parsing beyond the strategy's own. Every reader counts the
    `data:` lines it is fed (`events`): a cut stream's only measure of its output.
    """

    __slots__ = ("feed",)
    keeps_text: ClassVar[bool] = False  # whether `text` is the answer's, for an estimate
    framing_events: ClassVar[int] = 1  # of `events`, those that carry no token (chat's role)

    def __init__(self, feed: Callable[[bytes], bytes]) -> None:
        self.feed = feed

    @property
    @abstractmethod
    def events(self) -> int:
        """`data:` lines fed so far."""

    @abstractmethod
    def end(self) -> bytes:
        """Bytes still held when the upstream stream ends."""

    @abstractmethod
    def usage(self) -> Usage | None:
        """Usage the stream itself reported, if any."""

    @property
    def text(self) -> str:
        """The answer's text, where `keeps_text`."""
        return ""


class Watch(Tee):
    __slots__ = ("_finder",)

    def __init__(self) -> None:
        self._finder = UsageEventFinder()
        super().__init__(self._finder.feed)

    @property
    def events(self) -> int:
        return self._finder.events

    def end(self) -> bytes:
        self._finder.flush()
        return b""

    def usage(self) -> Usage | None:
        return self._finder.usage


class WatchResponses(Watch):
    """`Watch` for the Responses API: the usage is in `response.completed`; a cut stream's
    output is measured in its delta events (one marker count per chunk, as `Tee.feed`)."""

    __slots__ = ("_deltas",)
    framing_events = 0

    def __init__(self) -> None:
        super().__init__()
        self._deltas = 0
        self.feed = self._counted

    def _counted(self, chunk: bytes) -> bytes:
        self._deltas += chunk.count(b'.delta"')
        return self._finder.feed(chunk)

    @property
    def events(self) -> int:
        return self._deltas


class Drop(Tee):
    __slots__ = ("_dropper",)

    def __init__(self) -> None:
        self._dropper = UsageEventDropper()
        super().__init__(self._dropper.feed)

    @property
    def events(self) -> int:
        return self._dropper.events

    def end(self) -> bytes:
        return self._dropper.flush()

    def usage(self) -> Usage | None:
        return _reported(self._dropper.usage)


class _Collecting(Tee):
    __slots__ = ("_collector", "_events", "_read")
    keeps_text = True

    def __init__(self, collector: ContentCollector, read: Callable[[bytes], bytes]) -> None:
        super().__init__(self._counted)
        self._collector, self._read, self._events = collector, read, 0

    def _counted(self, chunk: bytes) -> bytes:
        self._events += chunk.count(b"data:")
        return self._read(chunk)

    @property
    def events(self) -> int:
        return self._events

    def usage(self) -> Usage | None:
        return _reported(self._collector.usage)

    @property
    def text(self) -> str:
        return self._collector.text


class Collect(_Collecting):
    __slots__ = ()

    def __init__(self) -> None:
        collector = ContentCollector()
        super().__init__(collector, collector.feed)

    def end(self) -> bytes:
        self._collector.flush()
        return b""


class CollectAddingUsage(_Collecting):
    __slots__ = ("_added", "_buffer", "_synthesize", "_template")

    def __init__(
        self, template: dict[str, Any], synthesize: Callable[[str], dict[str, int]]
    ) -> None:
        super().__init__(ContentCollector(), self._add_usage)
        self._template = template  # the answer's first event: the added chunk's identity
        self._synthesize = synthesize  # completion text → usage dict, for the added chunk
        self._buffer = EventBuffer()
        self._added = False

    def _add_usage(self, chunk: bytes) -> bytes:
        return self._relay(self._buffer.take(chunk)[0])

    def end(self) -> bytes:
        return self._relay(self._buffer.take(b"", final=True)[0]) + self._buffer.release()

    def _relay(self, events: list[tuple[bytes, bytes]]) -> bytes:
        collector, out = self._collector, []
        for event, ending in events:
            collector.observe(event)
            if collector.done and not self._added:
                out.append(usage_chunk(self._template, self._synthesize(collector.text)))
                self._added = True
            out.append(event + ending)
        return b"".join(out)


def _reported(raw: dict[str, Any] | None) -> Usage | None:
    return usage_from_json(raw) if raw is not None else None
