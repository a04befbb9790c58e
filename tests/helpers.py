"""Small helpers shared by the tests: polling instead of sleeping, free ports, the SSE
framings streams are run over, and the `sluicegate` command run as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

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
