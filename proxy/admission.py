"""Client keys (pure): who is calling, which routes they may use, and how fast.

A key is known by its SHA-256 only, so routes.yaml holds nothing worth stealing. Limits are
token buckets per key; `Limits` keeps them in this process (proxy.fleet shares them across
the fleet by the same rules): `rpm` admits a request per token; `tpm` admits while the
bucket is above zero and is charged the request's real usage when it ends, so one long
answer can overdraw it and later requests wait.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.config import ClientKey, Config
from proxy.errors import ModelNotAllowed, RateLimited, Unauthorized

KEY_PREFIX = "sk-sg-"


def rate_limited(key: ClientKey, kind: str, wait: float) -> RateLimited:
    """`kind`: "requests" (rpm ran out) or "tokens" (tpm did); `wait`: seconds to a retry."""
    limit = key.rpm if kind == "requests" else key.tpm
    return RateLimited(
        f"Rate limit reached for key '{key.name}': {limit} {kind} per minute.", kind, wait
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":  # ASGI servers lower-case header names
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def identify(config: Config, headers: Iterable[tuple[bytes, bytes]]) -> ClientKey | None:
    """The caller's key; None when no keys are configured (the proxy is open)."""
    if not config.keys:
        return None
    token = _bearer(headers)
    if token is None:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    key = config.key(hash_key(token))
    if key is None:
        raise Unauthorized("Incorrect API key provided.")  # never echoed, not even masked
    return key


def check_model(key: ClientKey | None, route: str) -> None:
    if key is not None and key.models is not None and route not in key.models:
        raise ModelNotAllowed(
            f"The key '{key.name}' may not use the model '{route}'.", param="model"
        )


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float

    def refill(self, per_minute: int, now: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.level = min(float(per_minute), self.level + elapsed * per_minute / 60)
        self.at = now


class Limits:
    """Per-process token buckets, by key name; kept across reloads (a changed limit applies
    from the next request on)."""

    def __init__(self) -> None:
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def admit(self, key: ClientKey | None, now: float) -> None:
        """Raises RateLimited, with the seconds until a retry can pass, or takes a request."""
        if key is None:
            return
        requests = self._bucket(self._requests, key.name, key.rpm, now)
        tokens = self._bucket(self._tokens, key.name, key.tpm, now)
        if requests is not None and key.rpm is not None and requests.level < 1:
            raise rate_limited(key, "requests", (1 - requests.level) * 60 / key.rpm)
        if tokens is not None and key.tpm is not None and tokens.level <= 0:
            raise rate_limited(key, "tokens", (1 - tokens.level) * 60 / key.tpm)
        if requests is not None:
            requests.level -= 1

    def charge(self, key: ClientKey | None, tokens: int, now: float) -> None:
        """A finished request's real usage, taken from the key's token bucket."""
        if key is None or key.tpm is None:
            return
        bucket = self._bucket(self._tokens, key.name, key.tpm, now)
        if bucket is not None:
            bucket.level -= tokens

    @staticmethod
    def _bucket(
        buckets: dict[str, _Bucket], name: str, per_minute: int | None, now: float
    ) -> _Bucket | None:
        if per_minute is None:
            return None
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = _Bucket(float(per_minute), now)  # starts full
        else:
            bucket.refill(per_minute, now)
        return bucket
