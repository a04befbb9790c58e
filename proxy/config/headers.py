"""Config loading, phase two: what an upstream request carries besides the body
(`forward_headers:`, `headers:`, `query:`). Which names may never travel is
`proxy.headers`' one list; this refuses any rule or header that would send one."""

from __future__ import annotations

import datetime
import re

from proxy.config.checks import Checks, Data
from proxy.config.document import child_path, describe
from proxy.config.model import Secret
from proxy.headers import CREDENTIALS, HOP_BY_HOP, PROXY_SET, refused_by

_RULE = re.compile(r"[!#$%&'+\-.^_`|~0-9A-Za-z*]+")  # an RFC 9110 token; `*`: any run
_NAME = re.compile(r"[!#$%&'+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no line breaks or controls
# A static header may be a credential of the upstream's (Azure's api-key, a custom
# Authorization scheme), but never one of these: the body's framing, the proxy's own.
_NOT_STATIC = HOP_BY_HOP | PROXY_SET | (CREDENTIALS - {"authorization", "cookie"})


class HeaderChecks(Checks):
    def forward_headers(self, data: Data, path: str) -> tuple[str, ...]:
        rules = []
        for rpath, rule in self.strings(data, "forward_headers", path, "header name"):
            if not _RULE.fullmatch(rule):
                got = self.shown(rpath, rule, bare=True)
                self.issue(rpath, f"expected a header name or a pattern like x-team-*, got {got}")
            elif refused := refused_by(rule):
                self.issue(
                    rpath,
                    f"would forward {', '.join(refused)}: a client's credentials, cookies, "
                    "hop-by-hop headers and the headers the proxy sets itself never go upstream",
                )
            else:
                rules.append(rule.lower())
        return tuple(rules)

    def static_headers(
        self, data: Data, path: str, api_key: str
    ) -> tuple[tuple[str, str | Secret], ...]:
        """A value from the environment (`${AZURE_KEY}`) is a Secret; none is ever echoed."""
        hpath = child_path(path, "headers")
        found: dict[str, str | Secret] = {}
        for name, npath, value in self.entries(
            data.get("headers"), hpath, dict, "header", empty=True
        ):
            lower = name.lower()
            if not _NAME.fullmatch(name):
                self.issue(npath, f"expected an HTTP header name, got {name!r}")
            elif lower in _NOT_STATIC:
                self.issue(npath, f"{lower} is set by the proxy or the connection, not by config")
            elif lower == "authorization" and api_key:
                self.issue(npath, "api_key is sent as Authorization: Bearer; keep one of them")
            elif lower in found:
                self.issue(npath, f"{lower} is given twice (header names ignore case)")
            elif not isinstance(value, str) or not _VALUE.fullmatch(value):
                # Not echoed: it may hold a key.
                self.issue(npath, "expected a string without line breaks or control characters")
            else:
                found[lower] = Secret(value) if npath in self.templates else value
        return tuple(found.items())

    def query(self, data: Data, path: str) -> tuple[tuple[str, str], ...]:
        qpath = child_path(path, "query")
        params = []
        for name, npath, raw in self.entries(
            data.get("query"), qpath, dict, "parameter", empty=True
        ):
            # `api-version: 2024-10-21`, unquoted, reads as a date
            value = raw.isoformat() if isinstance(raw, datetime.date) else raw
            if not name:
                self.issue(npath, "expected a non-empty parameter name")
            elif isinstance(value, bool) or not isinstance(value, str | int | float):
                self.issue(npath, f"expected a string, got {describe(value)}")
            else:
                params.append((name, str(value)))
        return tuple(params)
