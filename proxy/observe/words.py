"""Label values kept bounded, and the series they name kept at hand (no prometheus_client
here)."""

from __future__ import annotations

import re
from typing import Generic, Protocol, TypeVar

OTHER = "_other"  # a value outside the known set (defensive: the pipeline should not send one)


class Words:
    """Free-form reason words (fallback reasons, stream errors), kept bounded: word-shaped
    values are let in until `limit` distinct ones have been seen, then the rest is `_other`."""

    _SHAPE = re.compile(r"[a-z][a-z0-9_]{0,39}")

    def __init__(self, limit: int = 32, seed: frozenset[str] = frozenset()) -> None:
        self._seen, self._limit = set(seed), limit

    def __call__(self, word: str) -> str:
        if word in self._seen:
            return word
        if len(self._seen) < self._limit and self._SHAPE.fullmatch(word):
            self._seen.add(word)
            return word
        return OTHER


Child_co = TypeVar("Child_co", covariant=True)


class _Labelled(Protocol[Child_co]):
    def labels(self, *values: str) -> Child_co: ...


class Series(Generic[Child_co]):
    """A labelled metric whose children are kept by their label values: a series seen before
    costs one dict lookup, where prometheus-client's `labels()` checks and joins the values
    and takes a lock (~3 µs; a request observes about ten). As bounded as the values are:
    they are config names or fixed words (see `Words`)."""

    __slots__ = ("_children", "_make", "metric")

    def __init__(self, metric: _Labelled[Child_co]) -> None:
        self.metric, self._make = metric, metric.labels
        self._children: dict[tuple[str, ...], Child_co] = {}

    def labels(self, *values: str) -> Child_co:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._make(*values)
        return child
