"""The relay's tee for a translated stream: chat chunks in, Responses events out, as each
chunk arrives (`StreamTranslator`); usage and the answer's text for metering, as every tee."""

from __future__ import annotations

from proxy.metering.reported import usage_from_json
from proxy.metering.tee import Tee
from proxy.record import Usage
from proxy.responses.events import StreamTranslator
from proxy.sse import EventSplitter, parse


class Translating(Tee):
    __slots__ = ("_chunks", "_splitter", "_translator")
    keeps_text = True

    def __init__(self, translator: StreamTranslator) -> None:
        self._splitter = EventSplitter()
        self._translator = translator
        self._chunks = 0  # the upstream's `data:` lines: a cut stream's measure of its output
        super().__init__(self._translate)

    def _translate(self, chunk: bytes) -> bytes:
        self._chunks += chunk.count(b"data:")
        return self._events(self._splitter.feed(chunk))

    @property
    def events(self) -> int:
        return self._chunks

    def _events(self, events: list[bytes]) -> bytes:
        out = []
        for event in events:
            kind, payload = parse(event)
            if kind == "done":
                out.append(self._translator.done())
            elif payload is not None:
                out.append(self._translator.feed(payload))
        return b"".join(out)

    def end(self) -> bytes:
        """A stream that ends without `[DONE]` after its finish still completes; one cut
        before it does not (the relay ends it with the error event)."""
        last = self._events(self._splitter.flush())
        return last + (self._translator.done() if self._translator.answered else b"")

    def usage(self) -> Usage | None:
        reported = self._translator.usage
        return usage_from_json(reported) if reported is not None else None

    @property
    def text(self) -> str:
        return self._translator.text
