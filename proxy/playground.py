"""`GET /`: the playground, one self-contained HTML page shipped as package data. It talks to
the proxy only through the public API (`/v1/models`, `/v1/chat/completions`), as any client.

The page is read once, on first use. Its Content-Security-Policy allows exactly its own
inline script and style (by hash), requests to this origin, and nothing else."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

_INLINE = {
    "script-src": re.compile(rb"<script>(.*?)</script>", re.S),
    "style-src": re.compile(rb"<style>(.*?)</style>", re.S),
}


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and the headers it is served with."""
    html = files("proxy").joinpath("static", "playground.html").read_bytes()
    policy = ["default-src 'none'", "connect-src 'self'"]
    for directive, pattern in _INLINE.items():
        hashes = [f"'sha256-{_digest(m.group(1))}'" for m in pattern.finditer(html)]
        policy.append(" ".join([directive, *hashes]) if hashes else f"{directive} 'none'")
    policy += ["base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"]
    headers = {
        "content-security-policy": "; ".join(policy),
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    return html, headers


def _digest(content: bytes) -> str:
    return base64.b64encode(hashlib.sha256(content).digest()).decode()


async def playground(_request: Request) -> Response:
    body, headers = page()
    return Response(body, 200, headers, media_type="text/html")
