"""Config loading, phase two's tools: the generic checks a validator is made of. Each records
an issue at a YAML path (with its line) and returns a usable placeholder, so validation goes
on and one run reports every mistake."""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Literal, TypeVar

from proxy.config.document import YamlDocument, child_path, describe
from proxy.config.model import ConfigIssue

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Data = Mapping[str, object]
Kind = Literal["positive", "non-negative", "count"]  # > 0, >= 0, an integer >= 1
T = TypeVar("T")


class Checks:
    """Walks the data once. Every check records an issue and then returns a placeholder, so
    one mistake never hides the next; the placeholders are thrown away with the Config."""

    def __init__(self, source: str, doc: YamlDocument, main_port: int | None = None) -> None:
        self.source = source
        self.main_port = main_port  # `serve --port`, when known: metrics_port must differ
        self.lines = doc.lines
        self.templates = doc.templates  # expanded paths: show their "${...}", never the value
        self.issues = [ConfigIssue(source, p.line, p.path, p.message) for p in doc.problems]
        # A value YAML could not read or expand is reported once, not again as the wrong type.
        self.flagged = {p.path for p in doc.problems}
        self.declared: tuple[str, ...] | None = None  # upstream names, once known
        self.warnings: list[ConfigIssue] = []  # accepted, but worth a word to the operator

    def issue(self, path: str, message: str) -> None:
        if path not in self.flagged:
            self.issues.append(ConfigIssue(self.source, self.lines.get(path), path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ConfigIssue(self.source, self.lines.get(path), path, message))

    def shown(self, path: str, value: object, *, bare: bool = False) -> str:
        template = self.templates.get(path)
        if template is not None:
            return f"from {template!r}" if bare else f"the expansion of {template!r}"
        return repr(value) if bare else describe(value)

    def section(self, raw: object, path: str, cls: type[DataclassInstance], *required: str) -> Data:
        """A mapping with a fixed key set; anything unusable reads as empty so checks go on."""
        if not isinstance(raw, dict):
            self.issue(path, f"expected a mapping, got {describe(raw)}")
            return {}
        # The keys are the dataclass's fields, so the schema cannot drift from the types.
        allowed = [f.name for f in fields(cls) if f.init and f.name not in ("name", "source")]
        for key in raw:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
                self.issue(child_path(path, key), f"unknown key {key!r} ({hint})")
        for key in required:
            if key not in raw:
                self.issue(path, f"missing required key {key!r}")
            elif raw[key] is None:
                self.issue(child_path(path, key), "expected a value, got null")
        return raw

    def entries(
        self,
        raw: object,
        path: str,
        kind: type[dict[str, object] | list[object]],
        what: str,
        *,
        empty: bool = False,
    ) -> list[tuple[str, str, object]]:
        """(key, path, value) of each entry of a list or mapping; none if absent or invalid."""
        if raw is None:
            return []
        if not isinstance(raw, kind) or not (raw or empty):
            noun = "mapping" if kind is dict else "list"
            got = f"an empty {noun}" if isinstance(raw, kind) else describe(raw)
            need = f"a {noun} of {what}s" if empty else f"a {noun} of at least one {what}"
            self.issue(path, f"expected {need}, got {got}")
            return []
        if isinstance(raw, dict):
            return [(key, child_path(path, key), value) for key, value in raw.items()]
        return [(str(i), f"{path}[{i}]", value) for i, value in enumerate(raw)]

    def strings(self, data: Data, key: str, path: str, what: str) -> list[tuple[str, str]]:
        """(path, value) of each entry of a list of non-empty strings; none if absent."""
        path = child_path(path, key)
        found = []
        for _, item_path, value in self.entries(data.get(key), path, list, what):
            if not isinstance(value, str) or not value:
                self.issue(item_path, f"expected a non-empty string, got {describe(value)}")
            else:
                found.append((item_path, value))
        return found

    def string(
        self, data: Data, key: str, path: str, *, empty: bool = False, secret: bool = False
    ) -> str:
        """ "" when absent or invalid."""
        path = child_path(path, key)
        raw = data.get(key)
        if raw is None:
            return ""
        if not isinstance(raw, str):
            # A secret pasted in unquoted may read as a number: do not echo it.
            got = "another type" if secret else describe(raw)
            self.issue(path, f"expected a string, got {got}")
            return ""
        if not raw and not empty:
            self.issue(path, "expected a non-empty string")
        return raw

    def choice(self, data: Data, key: str, path: str, words: Mapping[str, T]) -> T:
        """data[key], one of `words` (the first is the default, also after an issue)."""
        default = next(iter(words.values()))
        word = self.string(data, key, path)
        if word and word not in words:
            wpath = child_path(path, key)
            got = self.shown(wpath, word, bare=True)
            self.issue(wpath, f"expected one of {', '.join(words)}, got {got}")
        return words.get(word, default)

    def number(self, data: Data, key: str, path: str, default: float, kind: Kind) -> float:
        """data[key], or `default` when absent or invalid (then with an issue)."""
        path, value = child_path(path, key), data.get(key)
        integer = kind == "count"
        least, inclusive = (1, True) if integer else (0, kind == "non-negative")
        if isinstance(value, str) and path in self.templates:
            # "${VAR}" expands to text; a number field reads it as a number if it is one.
            with contextlib.suppress(ValueError):
                value = int(value) if integer else float(value)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and isinstance(value, float))
            or not math.isfinite(value)
        ):
            expected = "an integer" if integer else "a number"
            self.issue(path, f"expected {expected}, got {self.shown(path, value)}")
        elif value < least or (value == least and not inclusive):
            bound = f"{least} or more" if inclusive else f"greater than {least}"
            self.issue(path, f"must be {bound}, got {self.shown(path, value)}")
        else:
            return value if integer else float(value)
        return default

    def optional_seconds(self, data: Data, key: str, path: str) -> float | None:
        if data.get(key) is None:
            return None
        return self.number(data, key, path, 1.0, "positive")

    def optional_int(self, data: Data, key: str, path: str) -> int | None:
        if data.get(key) is None:
            return None
        return int(self.number(data, key, path, 1, "count"))
