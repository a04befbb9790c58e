"""Knob `replay`: a provider's recorded answer, sent byte for byte (pure loading; the server
module schedules the writes).

A recording is a file in the directory the mock was given (`MockUpstream(replay_dir=...)`):
`<name>-stream.sse` answers stream requests, `<name>-body.json` the others. Its leading lines
that start with `#` say where the shape comes from and are not sent; every byte after them
is. A stream recording is cut into its events (each with the blank line that ends it) so
each leaves as its own write, as a real upstream's tokens do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from proxy.mock.content import Invalid

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # a file stem: no dots, no slashes


@dataclass(frozen=True, slots=True)
class Recording:
    content_type: bytes
    pieces: tuple[bytes, ...]  # one write each: a stream's events, or a body whole

    @property
    def payload(self) -> bytes:
        return b"".join(self.pieces)


def recording_path(directory: Path, name: str, stream: bool) -> Path:
    return directory / (f"{name}-stream.sse" if stream else f"{name}-body.json")


def strip_header(raw: bytes) -> bytes:
    """The bytes after the leading `#` lines (the provenance header)."""
    start = 0
    while raw.startswith(b"#", start):
        end = raw.find(b"\n", start)
        start = len(raw) if end == -1 else end + 1
    return raw[start:]


def split_events(payload: bytes) -> tuple[bytes, ...]:
    """LF-framed SSE cut after each blank line; a tail without one stays a piece of its own."""
    pieces, start = [], 0
    while (end := payload.find(b"\n\n", start)) != -1:
        pieces.append(payload[start : end + 2])
        start = end + 2
    if start < len(payload):
        pieces.append(payload[start:])
    return tuple(pieces)


def load(directory: Path | None, name: str, stream: bool) -> Recording:
    """The recording `name` for a stream or a non-stream request; `Invalid` when missing."""
    if directory is None:
        raise Invalid("Knob 'replay' needs a mock made with a replay_dir", "mock.replay")
    path = recording_path(directory, name, stream)
    if not path.is_file():
        raise Invalid(f"No recording {path.name!r} to replay", "mock.replay")
    payload = strip_header(path.read_bytes())
    if stream:
        return Recording(b"text/event-stream", split_events(payload) or (b"",))
    return Recording(b"application/json", (payload,))
