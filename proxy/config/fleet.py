"""Config loading, phase two: the fleet sections, `state:` and each key's `budget:`."""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.config.checks import Checks, Data
from proxy.config.document import child_path
from proxy.config.model import (
    BUDGET_PERIODS,
    ON_UNAVAILABLE,
    Budget,
    Secret,
    StateSettings,
)

_STATE = StateSettings()
_URL_HINT = "expected a redis:// or rediss:// URL with a host"


class FleetChecks(Checks):
    def state(self, raw: object) -> StateSettings:
        if raw is None:
            return _STATE
        data = self.section(raw, "state", StateSettings)
        mode = self.string(data, "on_unavailable", "state") or _STATE.on_unavailable
        if mode not in ON_UNAVAILABLE:
            mpath = "state.on_unavailable"
            self.issue(
                mpath, f"expected one of open, closed, got {self.shown(mpath, mode, bare=True)}"
            )
        prefix = self.string(data, "key_prefix", "state") if "key_prefix" in data else None
        return StateSettings(
            url=self.state_url(data),
            key_prefix=_STATE.key_prefix if prefix is None else prefix,
            on_unavailable=ON_UNAVAILABLE.get(mode, "open"),
            timeout=self.number(data, "timeout", "state", _STATE.timeout, "positive"),
        )

    def state_url(self, data: Data) -> Secret | None:
        """The URL may hold a password: it must come from the environment, and no message
        quotes it (only the `${VAR}` it was written as)."""
        path = "state.url"
        url = self.string(data, "url", "state", empty=True, secret=True)  # "${VAR:-}": none
        if not url:
            return None
        if path not in self.templates:
            self.issue(
                path,
                "expected a ${VAR} reference: the URL holds a password, keep it in the environment",
            )
            return None
        problem = _redis_url_problem(url)
        if problem:
            self.issue(path, f"{problem}, got {self.shown(path, url, bare=True)}")
            return None
        return Secret(url)

    def budget(self, raw: object, path: str) -> Budget | None:
        if raw is None:
            return None
        path = child_path(path, "budget")
        data = self.section(raw, path, Budget, "usd", "period")
        period = self.string(data, "period", path)
        if period and period not in BUDGET_PERIODS:
            ppath = child_path(path, "period")
            got = self.shown(ppath, period, bare=True)
            self.issue(ppath, f"expected one of day, month, total, got {got}")
        return Budget(
            usd=self.number(data, "usd", path, 0.0, "non-negative"),
            period=BUDGET_PERIODS.get(period, "day"),
        )


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, in words that quote none of it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return _URL_HINT + " and a valid port (1-65535)"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return _URL_HINT
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "expected a database number after the host (redis://host:6379/0)"
    return None
