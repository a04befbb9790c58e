"""The fleet in the app: `state:` is read at start-up (a reload that changes it says a
restart is needed, without quoting the URL), and without it the store is in-process."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from proxy.app import create_app
from proxy.fleet import LocalStore
from proxy.serving import RunningServer
from tests.helpers import wait_for

PASSWORD = "app-reload-test-password"


def _routes(mock_url: str, state: str = "") -> str:
    return f"""\
upstreams:
  mock: {{base_url: '{mock_url}/v1'}}
routes:
  - {{model: support-bot, targets: [{{upstream: mock, model: mock-chat}}]}}
{state}"""


def test_a_reload_that_changes_state_warns_a_restart_is_needed(
    tmp_path: Path, mock_server: RunningServer
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_routes(mock_server.url))
    env = {"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:9/0"}
    app = create_app(path, env=env, watch_interval=0.02)
    with capture_logs() as logs, RunningServer(app):
        assert isinstance(app.state.runtime.store, LocalStore)  # no `state:`: as before
        path.write_text(_routes(mock_server.url, "state: {url: '${REDIS_URL}'}\n"))
        assert wait_for(lambda: any(e["event"] == "restart_needed" for e in logs))
        assert isinstance(app.state.runtime.store, LocalStore)  # until the next start
    (warning,) = [e for e in logs if e["event"] == "restart_needed"]
    assert warning["settings"] == ["state"]
    assert PASSWORD not in repr(logs)
