"""Config loading, phase two: how an upstream is reached (`tls:`, `proxy:`)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from proxy.config.checks import Checks, Data
from proxy.config.document import child_path, describe
from proxy.config.model import Secret, Tls

_TLS = Tls()


class TransportChecks(Checks):
    def tls(self, raw: object, path: str, url: str) -> Tls:
        if raw is None:
            return _TLS
        path = child_path(path, "tls")
        data = self.section(raw, path, Tls)
        verify = self.flag(data, "verify", path, default=_TLS.verify)
        ca_file, cert_file, key_file = (
            self.pem_file(data, key, path) for key in ("ca_file", "cert_file", "key_file")
        )
        if key_file and not cert_file:
            self.issue(child_path(path, "key_file"), "needs tls.cert_file (the certificate)")
        if ca_file:
            self.pem_check(child_path(path, "ca_file"), lambda c: c.load_verify_locations(ca_file))
        if cert_file:
            self.pem_check(
                child_path(path, "cert_file"), lambda c: c.load_cert_chain(cert_file, key_file)
            )
        if not url.startswith("https:"):
            self.warn(path, "applies to https:// upstreams only; base_url is not one")
        if not verify:
            self.warn(
                child_path(path, "verify"),
                "false: the upstream's certificate is NOT checked; anyone on the path can read "
                "and change its traffic, keys included",
            )
        return Tls(ca_file or None, verify, cert_file or None, key_file or None)

    def flag(self, data: Data, key: str, path: str, *, default: bool) -> bool:
        value = data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.issue(child_path(path, key), f"expected true or false, got {describe(value)}")
            return default
        return value

    def pem_file(self, data: Data, key: str, path: str) -> str:
        """A file path that exists and can be read; "" when absent or not."""
        name = self.string(data, key, path)
        fpath = child_path(path, key)
        if name and not os.path.isfile(name):
            self.issue(fpath, f"no such file {self.shown(fpath, name, bare=True)}")
            return ""
        if name and not os.access(name, os.R_OK):
            self.issue(fpath, f"cannot read {self.shown(fpath, name, bare=True)}")
            return ""
        return name

    def pem_check(self, path: str, load: Callable[[ssl.SSLContext], object]) -> None:
        """Loads the files as the client will, so a wrong file fails `check`, not a request."""
        try:
            load(ssl.create_default_context())
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.issue(path, f"expected PEM that TLS can load, got an error: {exc}")

    def proxy(self, data: Data, path: str) -> Secret | None:
        """An http:// CONNECT proxy; it may hold credentials, so it is never echoed."""
        url = self.string(data, "proxy", path, secret=True)
        if not url:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            parts = urlsplit("")
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            self.issue(
                child_path(path, "proxy"),
                "expected http://[user:password@]host:port (not echoed: it may hold a password)",
            )
            return None
        return Secret(url)
