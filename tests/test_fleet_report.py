"""`sluicegate keys`: each key's limits, spend this period and remaining budget, from Redis
(in-process here, so coverage sees it; test_fleet_serve.py runs the real command)."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import orjson
import pytest

from proxy.cli import main
from tests.redis_server import RedisServer

PASSWORD = "keys-report-test-pass"
ROUTES = f"""\
upstreams:
  mock: {{base_url: 'http://127.0.0.1:9/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
state: {{url: '${{REDIS_URL}}'}}
keys:
  team-a: {{sha256: '{"a" * 64}', rpm: 600, tpm: 200000, budget: {{usd: 50, period: total}}}}
  team-b: {{sha256: '{"b" * 64}'}}
"""


def _keys(path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["keys", "--config", str(path), *args])
    return code, out.getvalue(), err.getvalue()


def test_keys_lists_limits_spend_and_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    with RedisServer(PASSWORD) as server:
        monkeypatch.setenv("REDIS_URL", server.url)
        with server.client() as client:
            client.set("sluicegate:{team-a}:spend:total", 12_345_678)  # micro-USD
        code, out, _ = _keys(path, "--json")
        assert code == 0
        rows = orjson.loads(out)
        assert rows[0] == {
            "key": "team-a",
            "rpm": 600,
            "tpm": 200000,
            "budget_usd": 50.0,
            "period": "total",
            "spent_usd": 12.345678,
            "remaining_usd": pytest.approx(37.654322),
        }
        assert rows[1]["spent_usd"] == 0.0
        assert rows[1]["remaining_usd"] is None  # no budget
        code, table, _ = _keys(path)
        assert code == 0
        lines = table.splitlines()
        assert lines[1].split() == ["team-a", "600", "200000", "50.000000", "total",
                                    "12.345678", "37.654322"]  # fmt: skip
        assert lines[2].split() == ["team-b", "-", "-", "-", "day", "0.000000", "-"]
    code, _, err = _keys(path)  # Redis gone
    assert code == 1
    assert "cannot reach the state store" in err
    assert PASSWORD not in err


def test_without_state_spend_is_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES.replace("state: {url: '${REDIS_URL}'}\n", ""))
    code, out, _ = _keys(path, "--json")
    assert code == 0
    assert [row["spent_usd"] for row in orjson.loads(out)] == [None, None]
    assert _keys(tmp_path / "missing.yaml")[0] == 1
