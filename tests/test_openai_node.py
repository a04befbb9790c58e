"""The official openai npm SDK (Node) gets the same answers through the proxy as the Python one,
chat and the Responses API; so does the Vercel AI SDK's default provider (Responses API).

tests/node/ pins the SDKs in package.json and package-lock.json (the AI SDK at 6: its 7 needs
Node 22); `scripts/test` installs them with `npm ci`. Without node the tests are skipped
locally and fail in CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.mock.upstream import MockUpstream, expected_content
from proxy.serving import RunningServer

NODE_DIR = Path(__file__).resolve().parent / "node"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is missing in CI: the openai npm SDK test needs Node 20 or later")
    pytest.skip(f"{name} is not installed")


def _installed_sdk() -> Path:
    """tests/node/node_modules, installed from the lock file if it is not there yet."""
    node = _tool("node")
    modules = NODE_DIR / "node_modules"
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all((modules / name / "package.json").exists() for name in wanted):
        result = subprocess.run(
            [_tool("npm"), "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return Path(node)


def _sdk_version() -> str:
    return str(json.loads((NODE_DIR / "node_modules/openai/package.json").read_text())["version"])


@pytest.mark.parametrize("package", ["openai", "ai", "@ai-sdk/openai"])
def test_the_lock_file_pins_the_sdk_that_package_json_names(package: str) -> None:
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"][package]
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"][package] == wanted
    assert lock["packages"][f"node_modules/{package}"]["version"] == wanted
    assert wanted[0].isdigit()  # an exact version, not a range


def run_node(
    script: str, proxy: RunningServer, seed: int, model: str = "support-bot"
) -> dict[str, Any]:
    """A script of tests/node against the proxy's route `model`; the JSON line it printed."""
    node = _installed_sdk()
    env = {"SLUICEGATE_BASE_URL": proxy.url + "/v1", "SEED": str(seed), "MODEL": model}
    result = subprocess.run(
        [str(node), str(NODE_DIR / script)],
        cwd=NODE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"openai@{_sdk_version()}: {result.stderr}"
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_node_sdk_stream_and_non_stream_through_the_proxy(proxy: RunningServer) -> None:
    seed = 23
    answer = run_node("chat.mjs", proxy, seed)
    want = expected_content(seed, 16)
    assert answer["non_stream"] == want
    assert answer["stream"] == want
    assert answer["non_stream_model"] == "mock-chat"  # the model that answered upstream
    # The client asked for usage, so the stream's own usage event reached the SDK.
    assert answer["stream_usage"]["completion_tokens"] == 16
    assert answer["non_stream_usage"]["completion_tokens"] == 16


def test_node_sdk_responses_through_the_proxy(proxy: RunningServer) -> None:
    """responses.create whole and streamed, a function call and json_schema output."""
    answer = run_node("responses.mjs", proxy, 29)
    want = expected_content(29, 16)
    assert answer["non_stream"] == answer["stream"] == want
    assert answer["non_stream_model"] == "mock-chat"
    assert (answer["stream_first"], answer["stream_last"]) == (
        "response.created",
        "response.completed",
    )
    assert answer["stream_usage"] == answer["non_stream_usage"]
    assert answer["stream_usage"]["output_tokens"] == 16
    call = answer["call"]
    assert (call["type"], call["name"], json.loads(call["arguments"])) == (
        "function_call",
        "get_weather",
        {"city": "mock"},
    )
    assert answer["structured"] == {"city": "mock", "celsius": 1}


def test_vercel_ai_sdk_default_provider_through_the_proxy(
    proxy: RunningServer, mock_app: MockUpstream
) -> None:
    """`openai(model)` from @ai-sdk/openai: generateText and streamText, on /v1/responses."""
    seen = len(mock_app.records)
    answer = run_node("ai-sdk.mjs", proxy, 0)
    want = expected_content(0, 16)
    assert answer["non_stream"] == answer["stream"] == want
    assert answer["non_stream_output_tokens"] == answer["stream_output_tokens"] == 16
    assert answer["finish"] == "stop"
    assert [("input" in r.body) for r in mock_app.records[seen:]] == [True, True]
