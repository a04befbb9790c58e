"""Reads routes.yaml: `document` turns the text into data with lines, `validate` checks it
into a `Config` or raises a ConfigError with every issue (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from proxy.config.document import YamlSyntaxError, compose
from proxy.config.model import Config, ConfigError, ConfigIssue
from proxy.config.validate import Validator


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    main_port: int | None = None,
) -> Config:
    """`main_port`: the port `serve` listens on, which `server.metrics_port` must not be."""
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: editors that write a BOM
            text = f.read()
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        raise ConfigError([ConfigIssue(source, None, "", message)]) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise ConfigError([ConfigIssue(source, None, "", message)]) from None
    return parse_config(text, source, os.environ if env is None else env, main_port=main_port)


def parse_config(
    text: str, source: str, env: Mapping[str, str], *, main_port: int | None = None
) -> Config:
    try:
        doc = compose(text, env)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(source, exc.line, exc.path, exc.message)]) from None
    v = Validator(source, doc, main_port)
    config = v.config(doc.data)
    if v.issues:
        # Unlocated issues (none are expected) go last; otherwise file order.
        raise ConfigError(sorted(v.issues, key=lambda i: (i.line is None, i.line or 0)))
    object.__setattr__(config, "warnings", tuple(v.warnings))
    return config
