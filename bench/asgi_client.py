"""The ASGI side of a request for the in-process benchmarks (`request_cost`, `versus_floor`):
a scope, a body for the lean mock, and a client that hands the body over in one message and
collects the answer, reporting the disconnect once the response is complete, as uvicorn's
`receive` does."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from procs import free_port, python, routes_yaml, start

HERE = Path(__file__).resolve().parent

TOKENS, DELAY = [8], [0.0]  # per short stream; request_cost's --tokens, --delay

CONTENT = re.compile(rb'"content":"[^"]')  # a content event (the role event's is "")


class Client:
    """The ASGI side of one request: the body in one message, the answer collected."""

    def __init__(self, body: bytes) -> None:
        self.body, self.sent = body, 0
        self.status, self.chunks = 0, 0
        self.first_content = 0.0
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self.sent:
            self.sent = 1
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            if message.get("body"):
                self.chunks += 1
                if not self.first_content and CONTENT.search(message["body"]):
                    self.first_content = time.perf_counter()
            if not message.get("more_body"):
                self.gone.set()  # as uvicorn's `receive` does once the response is complete


def scope(path: str) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-bench"),
        (b"user-agent", b"OpenAI/Python 1.0"),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def body(stream: bool, seed: int, knobs: dict[str, float] | None = None) -> bytes:
    messages = [
        {"role": "system", "content": "You are a helpful shop assistant."},
        {"role": "user", "content": f"Where is my parcel number {seed}?"},
    ]
    payload: dict[str, Any] = {"model": "bench", "messages": messages, "stream": stream}
    payload["mock"] = knobs or {"ttft": 0, "tokens": TOKENS[0], "delay": DELAY[0]}
    return orjson.dumps(payload)


async def call(app: Any, stream: bool, seed: int) -> Client:
    """One chat request through `app`, answered 200."""
    return await run(app, Client(body(stream, seed)))


async def run(app: Any, client: Client) -> Client:
    """`client`'s request through `app`, answered 200."""
    await app(scope("/v1/chat/completions"), client.receive, client.send)
    client.gone.set()
    assert client.status == 200, client.status
    return client


@contextmanager
def lean_upstream(mode: str) -> Iterator[tuple[Path, int]]:
    """`bench/lean_upstream.py` in a subprocess, and a routes file with one route to it in
    stream_options `mode`: (that file, the mock's port), for as long as the block runs."""
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="lean-upstream-"))
    mock = start("mock", python(str(HERE / "lean_upstream.py"), "--port", str(port)), 0, logs)
    try:
        time.sleep(1.0)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "routes.yaml"
            config.write_text(routes_yaml(f"http://127.0.0.1:{port}", mode))
            yield config, port
    finally:
        mock.stop()
