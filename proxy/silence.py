"""The body-silence timer of an upstream response: how long a read may wait for bytes.

Pure asyncio; `upstream` arms one per response it reads (aiohttp's reader is its only
dependency, and only as a type)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the reader's type; `upstream` stays the only module that imports aiohttp
    import aiohttp


class SilenceExceeded(Exception):
    """Set on a body reader by `SilenceTimer` when its upstream stayed silent too long."""


class SilenceTimer:
    """Bounds how long a body read may wait for bytes, with one timer per response that is
    re-armed only when it fires: aiohttp's `sock_read` instead cancels and re-creates a timer
    for every chunk. Only time spent waiting in a read counts, so a relay that is busy
    writing to a slow client never blames the upstream for the pause."""

    __slots__ = ("_content", "_handle", "_limit", "_loop", "now", "since")

    def __init__(self, content: aiohttp.StreamReader, limit: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time
        self._content, self._limit = content, limit
        self.since: float | None = None  # loop time the current read began waiting
        self._handle = self._loop.call_later(limit, self._check)

    def _check(self) -> None:
        if self._content.is_eof():  # read to its end, or the connection is gone: nothing to bound
            return
        since, now = self.since, self._loop.time()
        if since is not None and now - since >= self._limit:
            self._content.set_exception(SilenceExceeded())
            return
        due = (now if since is None else since) + self._limit
        self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._handle.cancel()
