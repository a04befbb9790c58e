"""Free-form label words, kept bounded (no prometheus_client here)."""

from __future__ import annotations

import re

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
