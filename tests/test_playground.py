"""The playground at `GET /`: one self-contained page, served from package data with a strict
CSP, that streams answers through the public API. It is driven in headless Chromium (Debian's
`chromium`, Playwright for Python pointed at it) against `sluicegate serve --demo` and against
in-process proxies with routes of their own.

Chromium missing: skipped on a workstation, a failure in CI (`scripts/test` installs it), as the
Prometheus and Node tests do."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, Request
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.mock.content import count_prompt_tokens, expected_content
from proxy.serving import RunningServer
from tests.helpers import ROOT, sluicegate, wait_for

ARTIFACTS = Path(os.environ.get("SLUICEGATE_ARTIFACTS") or ROOT / "test-artifacts")
# `sluicegate serve --demo`: its upstream answers 40 tokens, 0.2 s to the first, 0.04 s apart,
# priced at input 0.28, output 0.42 USD per million tokens (proxy/cli.py).
DEMO_TOKENS = 40
DEMO_INPUT, DEMO_OUTPUT = 0.28, 0.42
DEMO_TTFT_MS = 200
FINISHED = "s => ['done', 'error', 'stopped'].includes(document.querySelector(s).dataset.state)"
NO_VALUE = "\u2013"  # the en dash the page shows where it has no number
CLIENT_KEY = "sk-client-playground-0123"
UPSTREAM_KEY = "sk-upstream-never-shown-4567"

ROUTES = """\
upstreams:
  upstream-alpha:
    base_url: http://127.0.0.1:{dead_port}/v1
    timeouts: {{connect: 1, read: 2}}
  upstream-beta:
    base_url: {mock_url}/v1
    api_key: ${{BETA_KEY}}
    stream_options: pass
routes:
  - model: rescued
    targets: [{{upstream: upstream-alpha, model: primary-model}}]
    fallbacks: [{{upstream: upstream-beta, model: backup-model}}, \
{{upstream: upstream-beta, model: spare-model}}]
    retries: 0
  - model: free
    targets: [{{upstream: upstream-beta, model: unpriced-model}}]
pricing:
  primary-model: {{input: 100, cached_input: 10, output: 200}}
  backup-model: {{input: 1.5, cached_input: 0.5, output: 3}}
  unrelated-model: {{input: 7, cached_input: 7, output: 7}}
"""
PRICED = {
    "rescued": {
        "primary-model": {"input": 100.0, "cached_input": 10.0, "output": 200.0},
        "backup-model": {"input": 1.5, "cached_input": 0.5, "output": 3.0},
    },
    "free": {},
}


# --- servers and the browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`sluicegate serve --demo`: its URL, and the file holding what it printed."""
    printed = tmp_path_factory.mktemp("demo") / "printed.txt"
    with printed.open("wb") as sink, sluicegate("serve", "--demo", output=sink) as (_proc, url):
        yield url, printed


@pytest.fixture
def demo(demo_run: tuple[str, Path]) -> str:
    return demo_run[0]


@pytest.fixture(scope="module")
def priced(
    tmp_path_factory: pytest.TempPathFactory, mock_server: RunningServer, dead_port: int
) -> Iterator[str]:
    """A proxy whose route `rescued` is answered by a fallback, and `free` by an unpriced model."""
    path = tmp_path_factory.mktemp("playground") / "routes.yaml"
    path.write_text(ROUTES.format(mock_url=mock_server.url, dead_port=dead_port))
    app = create_app(path, env={"BETA_KEY": UPSTREAM_KEY}, watch_interval=None)
    with RunningServer(app) as server:
        yield server.url


@dataclass
class Tab:
    """A fresh browser context's page, with what it logged and what it asked for."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    chat_requests: list[Request] = field(default_factory=list)
    model_requests: list[Request] = field(default_factory=list)

    def open(self, url: str) -> None:
        self.page.goto(url + "/")
        self.page.wait_for_selector("#model option", state="attached")

    def ask(self, prompt: str, *, model: str | None = None, extra: object = None) -> None:
        if model is not None:
            self.page.select_option("#model", model)
        if extra is not None:
            self.page.locator("details").evaluate("details => { details.open = true; }")
            self.page.fill("#extra", extra if isinstance(extra, str) else json.dumps(extra))
        self.page.fill("#prompt", prompt)
        self.page.click("#send")

    def wait_finished(self) -> str:
        self.page.wait_for_function(FINISHED, arg="#status", timeout=30_000)
        return str(self.page.get_attribute("#status", "data-state"))

    def answer(self) -> str:
        return self.page.locator("#transcript li.assistant").last.locator(".text").inner_text()

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def value(self, selector: str) -> float:
        return float(self.page.get_attribute(selector, "data-value") or "nan")


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    tab = Tab(context.new_page())
    tab.page.on("console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else 0)
    tab.page.on("pageerror", lambda e: tab.console_errors.append(str(e)))

    def seen(request: Request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            tab.chat_requests.append(request)
        elif request.url.endswith("/v1/models"):
            tab.model_requests.append(request)

    tab.page.on("request", seen)
    yield tab
    context.close()


def screenshot(tab: Tab, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    tab.page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url + "/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# --- the page as served -------------------------------------------------------------------------


def test_root_serves_the_page_with_a_policy_that_allows_only_its_own_inline_code(
    priced: str,
) -> None:
    r = httpx.get(priced + "/", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.content
    assert html == (ROOT / "proxy" / "static" / "playground.html").read_bytes()
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))

    def digest(tag: bytes) -> str:
        (inline,) = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), html, re.S)
        return f"'sha256-{base64.b64encode(hashlib.sha256(inline).digest()).decode()}'"

    assert policy == {
        "default-src": "'none'",
        "connect-src": "'self'",
        "script-src": digest(b"script"),
        "style-src": digest(b"style"),
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    # Self-contained: nothing is loaded from anywhere, and the API is reached by relative URLs.
    assert not re.search(rb"\b(src|href)\s*=|@import|url\(|https?://", html)
    assert re.findall(rb'fetch\("([^"]+)"', html) == [b"v1/models", b"v1/chat/completions"]

    head = httpx.head(priced + "/", timeout=5)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-security-policy"] == r.headers["content-security-policy"]
    post = httpx.post(priced + "/", timeout=5)
    assert post.status_code == 405
    assert post.json()["error"]["code"] == "method_not_allowed"


def test_models_carry_the_prices_of_every_target_and_fallback(priced: str) -> None:
    r = httpx.get(priced + "/v1/models", timeout=5)
    assert r.json() == {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "sluicegate", "pricing": p}
            for name, p in PRICED.items()
        ],
    }
    for secret in ("upstream-alpha", "upstream-beta", "127.0.0.1", UPSTREAM_KEY):
        assert secret not in r.text


def test_openai_sdk_lists_models_and_keeps_the_extra_field(priced: str) -> None:
    client = openai.OpenAI(base_url=priced + "/v1", api_key="k", max_retries=0)
    models = list(client.models.list())
    assert [m.id for m in models] == ["rescued", "free"]
    assert {m.id: (m.model_extra or {})["pricing"] for m in models} == PRICED


def test_the_demo_prints_the_playground_address(demo_run: tuple[str, Path]) -> None:
    url, printed = demo_run
    assert f"playground: {url}/ " in printed.read_text()
    assert httpx.get(url + "/", timeout=5).headers["content-type"] == "text/html; charset=utf-8"


START_SAMPLING = """() => {
  window.samples = [];
  const tick = () => {
    const text = document.querySelector("#transcript li.assistant:last-child .text");
    if (text) window.samples.push(text.textContent);
    if (document.querySelector("#status").dataset.state !== "done") requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


def test_the_demo_answer_streams_in_with_its_ttft_tokens_and_cost(demo: str, tab: Tab) -> None:
    tab.open(demo)
    assert tab.page.locator("#model option").all_inner_texts() == ["support-bot"]
    before = scrape(demo)
    tab.page.evaluate(START_SAMPLING)
    tab.ask("双十一预售 什么时候开始?", model="support-bot")
    assert tab.wait_finished() == "done"

    final = expected_content(0, DEMO_TOKENS)
    assert tab.answer() == final
    # It streamed: animation frames saw the text grow, each time a prefix of the answer.
    partial = {s for s in tab.page.evaluate("window.samples") if s and s != final}
    assert all(final.startswith(s) for s in partial)
    assert len(partial) >= 3, partial

    (request,) = tab.chat_requests
    body = request.post_data_json
    messages = [{"role": "user", "content": "双十一预售 什么时候开始?"}]
    assert body == {
        "model": "support-bot",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "authorization" not in request.headers  # no key typed

    # The numbers are what the proxy itself counted for this request (metrics come after it).
    requests = "sluicegate_requests_total"
    assert wait_for(lambda: total(scrape(demo), requests) == total(before, requests) + 1)
    now = scrape(demo)
    prompt, completion = count_prompt_tokens(messages), DEMO_TOKENS
    tokens = "sluicegate_tokens_total"
    assert total(now, tokens, type="input") - total(before, tokens, type="input") == prompt
    assert total(now, tokens, type="output") - total(before, tokens, type="output") == completion
    assert tab.text("#tokens") == f"{prompt} prompt + {completion} completion"
    usd = (prompt * DEMO_INPUT + completion * DEMO_OUTPUT) / 1e6
    cost = "sluicegate_cost_usd_total"
    assert total(now, cost) - total(before, cost) == pytest.approx(usd, rel=1e-9)
    assert tab.value("#cost") == pytest.approx(usd, rel=1e-9)
    shown = tab.text("#cost")  # three significant digits
    assert shown.startswith("$0.0000")
    assert float(shown.removeprefix("$")) == pytest.approx(usd, rel=5e-3)
    assert tab.text("#answered-by") == "demo-chat"
    # The demo upstream waits 0.2 s before its first token; the page cannot have seen it sooner.
    ttft = tab.value("#ttft")
    assert ttft >= DEMO_TTFT_MS
    assert tab.text("#ttft") == f"{math.floor(ttft + 0.5)} ms"  # JavaScript's Math.round
    assert tab.console_errors == []  # among them, any Content-Security-Policy violation
    screenshot(tab, "playground.png")


def test_a_second_turn_sends_the_conversation(demo: str, tab: Tab) -> None:
    tab.open(demo)
    tab.ask("hi")
    assert tab.wait_finished() == "done"
    tab.ask("and then?")
    assert tab.wait_finished() == "done"
    first = expected_content(0, DEMO_TOKENS)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    ]
    assert tab.chat_requests[-1].post_data_json["messages"] == messages
    assert (
        tab.text("#tokens") == f"{count_prompt_tokens(messages)} prompt + {DEMO_TOKENS} completion"
    )
    assert tab.page.locator("#transcript li").count() == 4

    tab.page.click("#clear")
    assert tab.page.locator("#transcript li").count() == 0
    tab.ask("hi")
    assert tab.wait_finished() == "done"
    assert tab.chat_requests[-1].post_data_json["messages"] == [{"role": "user", "content": "hi"}]


def test_extra_body_is_merged_and_keepalives_and_split_characters_are_parsed(
    demo: str, tab: Tab
) -> None:
    """The mock sends `: keep-alive` comments, then writes every event in pieces cut inside
    multibyte characters and between the two newlines that end it."""
    tab.open(demo)
    extra = {"seed": 5, "mock": {"keepalives": 2, "split_utf8": True, "delay": 0}}
    tab.ask("hi", extra=extra)
    assert tab.wait_finished() == "done"
    assert tab.answer() == expected_content(5, DEMO_TOKENS)
    assert tab.chat_requests[-1].post_data_json["seed"] == 5
    assert tab.text("#tokens") == f"5 prompt + {DEMO_TOKENS} completion"
    assert tab.console_errors == []


def test_stop_ends_the_answer_where_it_was(demo: str, tab: Tab) -> None:
    tab.open(demo)
    tab.ask("hi", extra={"mock": {"delay": 1}})  # 40 s of answer
    tab.page.wait_for_function(
        "() => document.querySelector('#transcript li.assistant .text').textContent !== ''"
    )
    tab.page.click("#stop")
    assert tab.wait_finished() == "stopped"
    text = tab.answer()
    assert text
    assert expected_content(0, DEMO_TOKENS).startswith(text)
    assert len(text) < len(expected_content(0, DEMO_TOKENS))
    assert tab.page.is_enabled("#send")
    assert tab.page.is_disabled("#stop")
    assert tab.page.is_hidden("#error")


# --- errors ---------------------------------------------------------------------------------------


def test_an_error_answer_shows_its_status_code_and_message(demo: str, tab: Tab) -> None:
    tab.open(demo)
    tab.ask("hi", extra={"model": "no-such-route"})
    assert tab.wait_finished() == "error"
    body = {"model": "no-such-route", "messages": [{"role": "user", "content": "hi"}]}
    direct = httpx.post(demo + "/v1/chat/completions", json=body, timeout=10)
    assert direct.status_code == 404
    message = direct.json()["error"]["message"]
    assert tab.text("#error") == f"HTTP 404 (model_not_found): {message}"
    assert tab.page.locator("#transcript li.assistant.failed").count() == 1
    assert [tab.text(s) for s in ("#ttft", "#tokens", "#cost", "#answered-by")] == [NO_VALUE] * 4
    screenshot(tab, "playground-error.png")


def test_an_error_event_mid_stream_keeps_the_text_and_shows_the_error(demo: str, tab: Tab) -> None:
    mock = {"reset_after": 3}
    tab.open(demo)
    tab.ask("hi", extra={"mock": mock})
    assert tab.wait_finished() == "error"
    assert tab.answer() == expected_content(0, 3)
    # The error event the proxy ends such a stream with, as a direct client sees it.
    body = {
        "model": "support-bot",
        "stream": True,
        "mock": mock,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.stream("POST", demo + "/v1/chat/completions", json=body, timeout=10) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert tab.text("#error") == f"Error in the stream ({error['code']}): {error['message']}"
    assert tab.text("#tokens") == "not reported"


def test_an_extra_body_that_is_not_an_object_is_refused_before_sending(demo: str, tab: Tab) -> None:
    tab.open(demo)
    tab.ask("hi", extra="[1, 2]")
    assert tab.text("#error") == "The extra body is not valid: it is not a JSON object"
    tab.page.fill("#extra", "{nope")
    tab.page.click("#send")
    assert tab.text("#error").startswith("The extra body is not valid: ")
    assert tab.text("#error") != "The extra body is not valid: it is not a JSON object"
    assert tab.chat_requests == []


# --- prices, keys, and the SSE parser, on a proxy with routes of its own ------------------------


def test_a_fallback_is_priced_at_its_own_model_and_an_unpriced_one_says_so(
    priced: str, tab: Tab
) -> None:
    tab.open(priced)
    tab.ask("hi", model="rescued")  # its target is down; the fallback `backup-model` answers
    assert tab.wait_finished() == "done"
    assert tab.answer() == expected_content(0, 16)
    assert tab.text("#answered-by") == "backup-model"
    prompt = count_prompt_tokens([{"role": "user", "content": "hi"}])
    assert tab.value("#cost") == pytest.approx((prompt * 1.5 + 16 * 3) / 1e6, rel=1e-9)

    tab.page.click("#clear")
    tab.ask("hi", model="free")
    assert tab.wait_finished() == "done"
    assert tab.text("#answered-by") == "unpriced-model"
    assert tab.text("#tokens") == f"{prompt} prompt + 16 completion"
    assert tab.text("#cost") == "unpriced"


def test_a_non_stream_answer_asked_for_in_the_extra_body_is_shown_whole(
    priced: str, tab: Tab
) -> None:
    tab.open(priced)
    tab.ask("hi", model="rescued", extra={"stream": False, "seed": 3})
    assert tab.wait_finished() == "done"
    assert tab.answer() == expected_content(3, 16)
    assert tab.text("#answered-by") == "backup-model"
    prompt = count_prompt_tokens([{"role": "user", "content": "hi"}])
    assert tab.text("#tokens") == f"{prompt} prompt + 16 completion"
    assert tab.value("#cost") == pytest.approx((prompt * 1.5 + 16 * 3) / 1e6, rel=1e-9)


def test_an_api_key_is_sent_as_a_bearer_token_and_kept_in_the_tab_only(
    priced: str, browser: Browser, tab: Tab
) -> None:
    tab.open(priced)
    assert "authorization" not in tab.model_requests[-1].headers
    tab.page.fill("#key", CLIENT_KEY)
    tab.page.press("#key", "Tab")  # `change`: the models are listed again with the key
    assert wait_for(lambda: len(tab.model_requests) == 2)
    assert tab.model_requests[-1].headers["authorization"] == f"Bearer {CLIENT_KEY}"
    tab.ask("hi", model="free")
    assert tab.wait_finished() == "done"
    assert tab.chat_requests[-1].headers["authorization"] == f"Bearer {CLIENT_KEY}"

    stored = tab.page.evaluate(
        "() => [sessionStorage.length, localStorage.length, document.cookie]"
    )
    assert stored == [1, 0, ""]
    tab.page.reload()
    assert tab.page.input_value("#key") == CLIENT_KEY  # the same tab remembers it
    other = browser.new_context().new_page()
    other.goto(priced + "/")
    assert other.input_value("#key") == ""
    other.context.close()


PARSE_EVERY_SPLIT = """(stream) => {
  const bytes = new TextEncoder().encode(stream);
  const parse = (pieces) => {
    const events = [];
    const parser = sseParser((data) => events.push(data));
    pieces.forEach((piece) => parser.push(piece));
    parser.end();
    return JSON.stringify(events);
  };
  const results = new Set([parse([bytes]), parse([...bytes].map((b) => Uint8Array.of(b)))]);
  for (let i = 0; i <= bytes.length; i++) {
    for (let j = i; j <= bytes.length; j += 7) {
      results.add(parse([bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)]));
    }
  }
  return [...results].map((r) => JSON.parse(r));
}"""


def test_the_sse_parser_finds_the_same_events_however_the_bytes_are_split(
    priced: str, tab: Tab
) -> None:
    stream = (
        ": keep-alive\r\n\r\n"
        'data: {"content":"你好🎉 café"}\r\n\r\n'
        "event: ping\ndata: first\ndata:second\nid: 7\n\n"
        "data: one\r\ndata: two\r\n\r\n"
        ": comment\rdata: 限时🎁\r\r"
        "data\n\n"
        "data: [DONE]\n\n"
        "data: never terminated"
    )
    tab.open(priced)
    (events,) = tab.page.evaluate(PARSE_EVERY_SPLIT, stream)
    assert events == [
        '{"content":"你好🎉 café"}',
        "first\nsecond",
        "one\ntwo",
        "限时🎁",
        "",
        "[DONE]",
    ]
