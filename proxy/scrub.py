"""Takes an upstream's own key out of the error answers the proxy relays (pure).

Some upstreams quote the Authorization header they got in a 401, and the proxy relays error
answers to its clients. Every run of `MIN_RUN` or more characters of the key goes, however
JSON escaped it (`\\u0041`, `\\/`), in the body and in every header value: a key quoted in
part (cut short, or its tail) is as good as whole to whoever holds the rest. A compressed
body is decoded before this (`UpstreamResponse.read`), so nothing hides in an encoding.

Only answers read whole pass here, and they are bounded by `max_response_bytes`: the cost
is a few C-level `bytes.find` calls per run of the key, and a Python step per JSON escape.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from itertools import accumulate

from proxy.config import Secret, Upstream
from proxy.headers import Headers

SCRUBBED = b"***"
# Shorter runs are common words and ids; shorter "keys" are placeholders (vLLM's "EMPTY"):
# replacing them would only mangle a body.
MIN_RUN = 8
# JSON's escapes that can spell a printable ASCII character of a key: \u00XX, \" \\ \/.
_ESCAPE = re.compile(rb'\\(?:u00([2-7][0-9a-fA-F])|(["\\/]))')


def scrub_key(upstream: Upstream, body: bytes, headers: Headers) -> tuple[bytes, Headers]:
    """An error answer without the upstream's own key, nor the `headers:` values taken from
    the environment (Azure's api-key). For answers read whole (error answers); a committed
    answer's bytes are never touched."""
    secrets = [value for _, value in upstream.headers if isinstance(value, Secret)]
    if upstream.api_key is not None:
        secrets.append(upstream.api_key)
    runs = tuple({run for secret in secrets for run in _runs(secret.reveal().encode())})
    if not runs:
        return body, headers
    return scrub(runs, body), [(name, scrub(runs, value)) for name, value in headers]


def _runs(key: bytes) -> tuple[bytes, ...]:
    """Every `MIN_RUN`-byte stretch of the key: any longer run of it is a chain of these."""
    return tuple({key[i : i + MIN_RUN] for i in range(len(key) - MIN_RUN + 1)})


def scrub(runs: tuple[bytes, ...], data: bytes) -> bytes:
    """data with every stretch made of `runs` (each as it is or JSON-escaped) as `SCRUBBED`."""
    plain, escapes = _unescaped(data)
    spans = _merged(_found(runs, plain))
    if not spans:
        return data
    where = _Positions(escapes)
    out: list[bytes] = []
    last = 0
    for start, end in spans:
        raw_start, raw_end = where.start(start), where.end(end)
        out += (data[last:raw_start], SCRUBBED)
        last = raw_end
    out.append(data[last:])
    return b"".join(out)


# An escape as (its character's place in the unescaped bytes, its start and end in data).
Escape = tuple[int, int, int]


def _unescaped(data: bytes) -> tuple[bytes, list[Escape]]:
    if b"\\" not in data:  # the usual body: nothing to undo
        return data, []
    out, escapes, last = bytearray(), [], 0
    for match in _ESCAPE.finditer(data):
        out += data[last : match.start()]
        hexa, char = match.groups()
        escapes.append((len(out), match.start(), match.end()))
        out += bytes([int(hexa, 16)]) if hexa is not None else char
        last = match.end()
    out += data[last:]
    return bytes(out), escapes


def _found(runs: tuple[bytes, ...], data: bytes) -> list[tuple[int, int]]:
    spans = []
    for run in runs:
        at = data.find(run)
        while at != -1:
            spans.append((at, at + len(run)))
            at = data.find(run, at + 1)
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching spans as one: a long run of the key is scrubbed whole."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class _Positions:
    """Maps places in the unescaped bytes back to the escaped ones."""

    def __init__(self, escapes: list[Escape]) -> None:
        self._at = [at for at, _, _ in escapes]
        self._escapes = escapes
        # Bytes the first k escapes add over their one character each.
        self._grown = [0, *accumulate(end - start - 1 for _, start, end in escapes)]

    def start(self, at: int) -> int:
        k = bisect_left(self._at, at)
        if k < len(self._at) and self._at[k] == at:
            return self._escapes[k][1]
        return at + self._grown[k]

    def end(self, end: int) -> int:
        last = end - 1
        k = bisect_left(self._at, last)
        if k < len(self._at) and self._at[k] == last:
            return self._escapes[k][2]
        return last + self._grown[k] + 1
