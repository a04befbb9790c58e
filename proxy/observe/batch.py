"""The access log and the metrics observe finished requests in batches, off the requests' own
path (issue 18).

Run once per request, as each one ends, their code is cold every time: in a real request's
company the access-log line cost ~3x what the same line costs in a loop, and the metrics
observer ~2x. Queued and run over a batch (every `BATCH_SECONDS`, or at once past
`BATCH_MOST` records), each observer's code stays hot from one record to the next, the
batch's log lines go out in one write, and no request waits for either. What it costs:
a line or a count shows up to `BATCH_SECONDS` later. `/metrics` drains the queue before it
answers, and so does shutdown: nothing is lost, nothing a scrape reads is stale in this
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from proxy.record import Observer, RequestRecord

BATCH_SECONDS = 0.05  # nginx's `access_log ... flush=` does the same, by the second
BATCHED = "batched"  # its name among `Observers.on_finish`
BATCH_MOST = 256  # records: past it the batch runs at once (memory, and a scrape's wait)
HANDOFF_SECONDS = 1.0  # a drain asked from another thread waits this long for the loop's


class Batched:
    """An observer that queues each record and hands the queue to `observers` in order, one
    observer over the whole batch at a time. A failing observer is counted (`failed(name)`)
    per record, as `Observers` does, and never stops the others or the batch. The batch runs
    inside `held()` (the log's lines held, then written at once)."""

    __slots__ = ("_failed", "_handle", "_held", "_loop", "_most", "_observers", "_pending", "_wait")

    def __init__(
        self,
        observers: Sequence[tuple[str, Observer]],
        failed: Callable[[str], None],
        held: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        *,
        wait: float | None = None,
        most: int | None = None,
    ) -> None:
        self._observers = tuple(observers)
        self._failed, self._held = failed, held
        self._wait = BATCH_SECONDS if wait is None else wait
        self._most = BATCH_MOST if most is None else most
        self._pending: list[RequestRecord] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one records are queued in

    def __call__(self, record: RequestRecord) -> None:
        pending = self._pending
        pending.append(record)
        if len(pending) >= self._most:
            self.drain()
        elif self._handle is None:
            loop = _running_loop()
            if loop is None:  # no loop to wait in: now
                self.drain()
                return
            self._loop, self._handle = loop, loop.call_later(self._wait, self.drain)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> None:
        """Runs the observers over every queued record now. Asked from another thread (the
        metrics listener's, `--metrics-port`), it is done in the loop's, which this thread
        waits for (at most `HANDOFF_SECONDS`): queue and timer belong to the loop."""
        loop = self._loop
        if loop is not None and loop is not _running_loop() and loop.is_running():
            done = threading.Event()

            def drain_then_say() -> None:
                try:
                    self.drain()
                finally:
                    done.set()

            loop.call_soon_threadsafe(drain_then_say)
            done.wait(HANDOFF_SECONDS)
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        failed = self._failed
        with self._held():
            for name, observe in self._observers:
                for record in batch:
                    try:
                        observe(record)
                    except Exception:  # observers never steer, nor stop one another
                        failed(name)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
