"""`sluicegate keys`: each client key's limits, its spend this period and what is left of its
budget, read from the state store (a table, or JSON for scripts)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from proxy.config import Config
from proxy.fleet.periods import MICROS, period_id, period_of
from proxy.fleet.store import StoreDown

_COLUMNS = ("key", "rpm", "tpm", "budget_usd", "period", "spent_usd", "remaining_usd")
_TIMEOUT = 5.0  # a command, not a request: Redis gets a while to answer


def key_rows(config: Config, now: float | None = None) -> list[dict[str, Any]]:
    """One row per key; spend is None without `state.url` (it lives inside each process).
    Raises StoreDown when Redis cannot be reached."""
    now = time.time() if now is None else now
    periods = [(key.name, period_id(period_of(key), now)) for key in config.keys]
    spent = asyncio.run(_read(config, periods)) if config.state.url is not None else None
    rows = []
    for i, key in enumerate(config.keys):
        usd = None if spent is None else spent[i] / MICROS
        budget = key.budget.usd if key.budget is not None else None
        left = None if usd is None or budget is None else max(0.0, budget - usd)
        values = (key.name, key.rpm, key.tpm, budget, period_of(key), usd, left)
        rows.append(dict(zip(_COLUMNS, values, strict=True)))
    return rows


async def _read(config: Config, periods: list[tuple[str, str]]) -> list[int]:
    from proxy.fleet.remote import RedisState  # noqa: PLC0415  # Redis only with `state.url`

    remote = RedisState(config.state)
    try:
        async with asyncio.timeout(_TIMEOUT):
            return await remote.spent(periods)
    except TimeoutError:
        raise StoreDown("TimeoutError") from None
    finally:
        await remote.aclose()


def render(rows: list[dict[str, Any]], *, as_json: bool) -> str:
    if as_json:
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
    cells = [list(_COLUMNS)] + [[_cell(row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
