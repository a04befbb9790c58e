"""What `GET /v1/models` lists, and `/v1/models/{model}` answers: one entry per route, in
OpenAI's shape, plus the prices of the upstream models that route may answer with (a
sluicegate extra that OpenAI's SDKs ignore).

Only route names, upstream model names and prices: never upstream names, URLs or keys."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import ClientKey, Config, Price, Route
from proxy.errors import unknown_model

ModelEntry = dict[str, object]


def model_entries(config: Config, key: ClientKey | None = None) -> list[ModelEntry]:
    """Every route, or the ones `key` may use."""
    allowed = None if key is None else key.models
    return [
        {
            "id": route.model,
            "object": "model",
            "created": 0,
            "owned_by": "sluicegate",
            "pricing": route_pricing(route, config.pricing),
        }
        for route in config.routes
        if allowed is None or route.model in allowed
    ]


def model_entry(config: Config, key: ClientKey | None, model: str) -> ModelEntry:
    """`GET /v1/models/{model}`: the entry `/v1/models` lists for it; 404 in OpenAI's shape for
    a model that is not a route, or not one `key` may use."""
    for entry in model_entries(config, key):
        if entry["id"] == model:
            return entry
    raise unknown_model(model, config.server.max_echoed_chars)


def route_pricing(route: Route, pricing: Mapping[str, Price]) -> dict[str, dict[str, float]]:
    """USD per million tokens for every target and fallback model that has a price, keyed by
    the upstream model name that streamed chunks carry in their `model` field."""
    prices: dict[str, dict[str, float]] = {}
    for target in (*route.targets, *route.fallbacks):
        price = pricing.get(target.model)
        if price is not None:
            prices[target.model] = {
                "input": price.input,
                "cached_input": price.cached_input,
                "output": price.output,
            }
    return prices
