"""Small helpers shared by the tests: polling instead of sleeping, free ports, the SSE
framings streams are run over, and the `sluicegate` command run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent

# A well-behaved client's slowest time to first token while an attack runs: the mock answers
# at once, so this is the proxy's own delay. Past it, the event loop was pinned.
TTFT_BOUND = 1.0  # seconds
_HI: Any = [{"role": "user", "content": "hi"}]

# Some upstreams frame SSE with CRLF (servers behind Java and .NET stacks); a lone CR is SSE too.
FRAMINGS = pytest.mark.parametrize("newline", ["lf", "crlf", "cr"])


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Polls until `predicate()` holds; False if it never did within `seconds`."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def until(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    """`wait_for` inside an event loop: polls without blocking it."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def sluicegate(
    *args: str,
    ready: str = "/readyz",
    env: Mapping[str, str] | None = None,
    output: int | IO[bytes] = subprocess.DEVNULL,
    command: Sequence[str] = (sys.executable, "-m", "proxy"),
    cwd: Path = ROOT,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`COMMAND ARGS --port P` (`python -m proxy` unless told), yielded once GET `ready`
    answers 200; stopped after."""
    port = free_port()
    proc = subprocess.Popen(
        [*command, *args, "--port", str(port)],
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started = wait_for(lambda: answers(url + ready) or proc.poll() is not None, 60)
        assert started, f"sluicegate {' '.join(args)} did not start within 60 s"
        assert proc.poll() is None, f"sluicegate {' '.join(args)} exited at start-up"
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Prober(threading.Thread):
    """Streams one short chat after another until stopped, timing each first token."""

    def __init__(self, url: str, model: str = "bot") -> None:
        super().__init__(daemon=True)
        self._client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        self._model = model
        self._halt = threading.Event()
        self.ttfts: list[float] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.perf_counter()
            try:
                stream = self._client.chat.completions.create(
                    model=self._model, messages=_HI, stream=True, timeout=30
                )
                first = next(chunk for chunk in stream if chunk.choices)
                self.ttfts.append(time.perf_counter() - started)
                assert first.choices[0].delta.content is not None
                stream.close()
            except Exception as exc:  # kept and asserted on by the test
                self.errors.append(exc)

    def __enter__(self) -> Prober:
        self.start()
        assert wait_for(lambda: len(self.ttfts) >= 3, 30), self.errors
        return self

    def __exit__(self, *_exc: object) -> None:
        self._halt.set()
        self.join(30)

    def assert_served(self, served_before: int) -> None:
        assert not self.errors, self.errors
        assert len(self.ttfts) > served_before + 1, "the client was not served during the attack"
        assert max(self.ttfts) < TTFT_BOUND, f"slowest TTFT {max(self.ttfts):.2f} s"
