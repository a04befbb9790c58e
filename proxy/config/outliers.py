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
            if factor is not None and factor <= 1.0:
                self.issue(child_path(path, "factor"), f"must be more than 1, got {factor}")
        return Outliers(
            factor=factor,
            min_samples=int(self.number(data, "min_samples", path, _OUTLIERS.min_samples, "count")),
            seconds=self.number(data, "seconds", path, _OUTLIERS.seconds, "positive"),
        )

    def hedge_after(self, data: Data, path: str) -> float | Literal["auto"] | None:
        if data.get("hedge_after") == "auto":
            return "auto"
        return self.optional_seconds(data, "hedge_after", path)
