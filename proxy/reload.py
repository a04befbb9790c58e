"""Hot reload of routes.yaml: on a file change (polled) or SIGHUP.

The new file is validated first; an invalid edit is refused, logged with its error paths,
and the running config keeps serving. A valid one becomes a new AppState, swapped in whole:
requests in flight finish on the state they started with. Upstreams whose definition did
not change keep their client (and warm connections); replaced clients are closed once the
requests that may use them have had `drain_seconds` to finish.

The poll compares the file's (inode, size, mtime) through symlinks, so Kubernetes'
ConfigMap update (an atomic swap of a `..data` symlink) is seen like an edit in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.config import ConfigError, ConfigIssue, load_config
from proxy.latency import targets_of
from proxy.state import AppState, Runtime, StateRef
from proxy.upstream import UpstreamClients

ReloadObserver = Callable[[bool, ConfigError | None], None]
POLL_SECONDS = 1.0
SETTLE_SECONDS = 0.1


class Reloader:
    def __init__(
        self,
        path: Path,
        env: Mapping[str, str] | None,
        ref: StateRef,
        runtime: Runtime,
        on_reload: ReloadObserver,
    ) -> None:
        self._path, self._env, self._ref, self._runtime = path, env, ref, runtime
        self._on_reload = on_reload
        self._stamp = _stamp(path)
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.applied = 0  # reloads that took effect
        self.refused = 0  # invalid edits that were turned away

    def start(self) -> AppState:
        config = load_config(self._path, self._env)
        state = AppState(config, UpstreamClients(config.upstreams), self._runtime)
        self._ref.current = state
        return state

    async def reload(self) -> bool:
        async with self._lock:
            self._stamp = _stamp(self._path)
            try:
                # Off the event loop: a big or hostile file must not stall the requests.
                config = await asyncio.to_thread(load_config, self._path, self._env)
            except ConfigError as exc:
                self.refused += 1
                self._on_reload(False, exc)
                return False
            except Exception as exc:  # a loader bug must not kill the watcher: refuse the edit
                self.refused += 1
                issue = ConfigIssue(str(self._path), None, "", f"could not be read: {exc!r}")
                self._on_reload(False, ConfigError([issue]))
                return False
            old = self._ref.current
            clients = UpstreamClients(config.upstreams, reuse=old.clients if old else None)
            self._ref.current = AppState(config, clients, self._runtime)
            self._runtime.health.keep_only(config.upstreams)
            self._runtime.latency.keep_only(targets_of(config))
            if old is not None and old.clients.not_in(clients):
                delay = config.server.drain_seconds
                task = asyncio.ensure_future(self._retire(old.clients, clients, delay))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            self.applied += 1
            self._on_reload(True, None)
            return True

    async def _retire(self, old: UpstreamClients, new: UpstreamClients, delay: float) -> None:
        await asyncio.sleep(delay)
        await old.aclose_except(new)

    async def watch(self, interval: float = POLL_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                continue
            # Editors write in several steps: reload once the file has held still briefly.
            await asyncio.sleep(min(interval, SETTLE_SECONDS))
            if _stamp(self._path) == stamp:
                await self.reload()

    def install_sighup(self) -> bool:
        """SIGHUP → reload; only possible in the main thread (not in threaded test servers)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        except (RuntimeError, ValueError, NotImplementedError):
            return False
        return True

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._closing)
        state = self._ref.current
        self._ref.current = None
        if state is not None:
            await state.clients.aclose()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's swap shows as a new inode
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
