"""Config loading, phase two: what a route knows of live latency (`outliers:`, `hedge_after`)."""

from __future__ import annotations

from typing import Literal

from proxy.config.checks import Checks, Data
from proxy.config.document import child_path
from proxy.config.model import Outliers

_OUTLIERS = Outliers()


class LatencyChecks(Checks):
    def outliers(self, raw: object, path: str) -> Outliers:
        if raw is None:
            return _OUTLIERS
        path = child_path(path, "outliers")
        data = self.section(raw, path, Outliers)
        factor = _OUTLIERS.factor
        if "factor" in data:
            factor = self.optional_seconds(data, "factor", path)  # null: never eject
            fpath = child_path(path, "factor")
            if factor is not None and factor <= 1.0:
                self.issue(fpath, f"must be more than 1, got {self.shown(fpath, data['factor'])}")
        return Outliers(
            factor=factor,
            min_samples=int(self.number(data, "min_samples", path, _OUTLIERS.min_samples, "count")),
            seconds=self.number(data, "seconds", path, _OUTLIERS.seconds, "positive"),
        )

    def hedge_after(self, data: Data, path: str) -> float | Literal["auto"] | None:
        value = data.get("hedge_after")
        if value == "auto":
            return "auto"
        if isinstance(value, str):
            hpath = child_path(path, "hedge_after")
            self.issue(hpath, f"expected seconds or auto, got {self.shown(hpath, value)}")
            return None
        return self.optional_seconds(data, "hedge_after", path)
