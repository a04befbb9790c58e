"""Providers' recorded stream shapes (tests/fixtures/providers) replayed by the mock upstream
byte for byte, through a real proxy: what each test_provider_*.py file asks of one shape.

`Shapes` serves the mock (knob `replay`) and one proxy in front of it with two routes:
`shape` (no first-token deadline) and `hurried` (a 0.3 s one, on an upstream that never
cools down, so its deliberate timeouts do not take it out).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from proxy.app import create_app
from proxy.mock.replay import recording_path, split_events, strip_header
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.record import RequestRecord, Usage
from proxy.serving import RunningServer
from tests.helpers import wait_for

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"
FIRST_TOKEN_TIMEOUT = 0.3
PAUSE = 1.0  # silence in the replay: well past FIRST_TOKEN_TIMEOUT
INPUT, CACHED_INPUT, OUTPUT = 0.28, 0.028, 0.42  # USD per million tokens
INCLUDE_USAGE = {"include_usage": True}
MESSAGES: Any = [{"role": "user", "content": "双十一 has which deals?"}]

ROUTES = """\
upstreams:
  shapes: {{base_url: '{url}/v1', api_key: sk-shapes}}
  hurried: {{base_url: '{url}/v1', api_key: sk-shapes, cooldown: {{failures: 1000000}}}}
routes:
  - {{model: shape, targets: [{{upstream: shapes, model: shape-model}}]}}
  - model: hurried
    first_token_timeout: {first_token}
    targets: [{{upstream: hurried, model: shape-model}}]
pricing:
  shape-model: {{input: {input}, cached_input: {cached}, output: {output}}}
"""


def recording(name: str, stream: bool = True) -> bytes:
    """The bytes the mock sends for recording `name` (its provenance header left out)."""
    return strip_header(recording_path(FIXTURES, name, stream).read_bytes())


def without_usage_event(payload: bytes) -> bytes:
    """The recording as a client that did not ask for usage gets it: the usage-only event out."""
    usage_only = (b'"choices":[]', b'"usage":{')
    return b"".join(e for e in split_events(payload) if not all(m in e for m in usage_only))


def cost(usage: Usage) -> float:
    priced = usage.input * INPUT + usage.cached_input * CACHED_INPUT
    return (priced + usage.completion * OUTPUT) / 1e6


@dataclass
class Shapes:
    url: str
    mock: MockUpstream
    finished: list[RequestRecord] = field(default_factory=list)

    def post(
        self,
        name: str,
        *,
        route: str = "shape",
        options: dict[str, Any] | None = INCLUDE_USAGE,
        **knobs: Any,
    ) -> tuple[httpx.Response, bytes, RequestRecord]:
        """Streams recording `name` through the proxy with httpx, sending `options` as
        stream_options: the response, its raw bytes, and the proxy's record of it."""
        body: dict[str, Any] = {"model": route, "messages": MESSAGES, "stream": True}
        body["mock"] = {"replay": name, **knobs}
        if options is not None:
            body["stream_options"] = options
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=10) as r:
            raw = b"".join(r.iter_raw())
        return r, raw, self.record_of(r.headers["x-request-id"])

    def record_of(self, request_id: str) -> RequestRecord:
        """The proxy's record of the request with this id, once it has finished (another
        test's request may finish in between, so not by position)."""
        mine = [None]

        def finished() -> bool:
            mine[0] = next((r for r in self.finished if r.request_id == request_id), None)
            return mine[0] is not None

        assert wait_for(finished), f"no record of request {request_id}"
        assert mine[0] is not None
        return mine[0]

    def paused(self, name: str, events: int) -> tuple[int, bytes]:
        """Status and bytes when the replay goes silent for PAUSE s after its first `events`
        events, on the route with a FIRST_TOKEN_TIMEOUT deadline: 200 if the proxy had seen
        the first token by then, 504 if not."""
        response, raw, _ = self.post(
            name, route="hurried", replay_pause_at=events, pause_after_first=PAUSE
        )
        return response.status_code, raw

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0)

    def sdk_stream(self, name: str, *, usage: bool = True) -> list[Any]:
        """The chunks the openai SDK parses from recording `name` through the proxy."""
        options: Any = {"include_usage": True} if usage else openai.NOT_GIVEN
        return list(
            self.client().chat.completions.create(
                model="shape",
                messages=MESSAGES,
                stream=True,
                stream_options=options,
                extra_body={"mock": {"replay": name}},
            )
        )

    def upstream_body(self) -> dict[str, Any]:
        return self.mock.records[-1].body


@contextmanager
def serve_shapes(directory: Path) -> Iterator[Shapes]:
    mock = MockUpstream(Knobs(ttft=0, delay=0.001), replay_dir=FIXTURES)
    with RunningServer(mock) as upstream:
        shapes = Shapes("", mock)
        path = directory / "routes.yaml"
        path.write_text(
            ROUTES.format(
                url=upstream.url,
                first_token=FIRST_TOKEN_TIMEOUT,
                input=INPUT,
                cached=CACHED_INPUT,
                output=OUTPUT,
            )
        )
        app = create_app(path, env={}, watch_interval=None, observers=(shapes.finished.append,))
        with RunningServer(app) as proxy:
            shapes.url = proxy.url
            yield shapes
