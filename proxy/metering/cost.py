"""What a request cost, in USD (pure arithmetic over a configured `Price`)."""

from __future__ import annotations

from proxy.config import Price
from proxy.record import Usage


def cost_usd(usage: Usage, price: Price | None) -> float | None:
    """USD for the request; None (not 0) when the model has no price, so it counts as unpriced."""
    if price is None:
        return None
    return (
        usage.input * price.input
        + usage.cached_input * price.cached_input
        + usage.completion * price.output
    ) / 1_000_000
