"""Phase 1 of config loading: YAML text → plain data plus a map from path to line number.

yaml.safe_load throws source positions away, so this composes the node tree instead and
records where every value was written; the validator in proxy.config then reports each
problem at its exact line. Paths read like "routes[2].fallbacks[0].upstream"; "" is the root.

${VAR} and ${VAR:-default} are expanded here too: only at this level is a string value told
apart from a mapping key, which is never expanded.

Aliases are expanded as the data is built, so a few hundred bytes of nested aliases (a "billion
laughs" file) could ask for billions of values: the builder counts every value it makes and
refuses the document past MAX_YAML_VALUES, before the memory or the time is spent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

_STD = "tag:yaml.org,2002:"
_MERGE_TAG = _STD + "merge"
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")  # "$${" is a literal "${"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values one document may build, aliases expanded: a routes file of a thousand routes makes
# some ten thousand; building this many takes about a quarter of a second.
MAX_YAML_VALUES = 100_000


class YamlProblem(NamedTuple):
    line: int | None
    path: str
    message: str


class YamlSyntaxError(Exception):
    """The text is not YAML at all; nothing past this point can be checked."""

    def __init__(self, line: int | None, message: str, path: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.message = message
        self.path = path


@dataclass(slots=True)
class YamlDocument:
    data: object  # dict[str, object] | list[object] | scalar; None for an empty document
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[YamlProblem] = field(default_factory=list)
    # path → the text a string value was expanded from. Messages quote that, never the
    # value, which may be a secret.
    templates: dict[str, str] = field(default_factory=dict)


def child_path(parent: str, key: str) -> str:
    key = key or '""'  # an empty key must still show in the path
    return f"{parent}.{key}" if parent else key


def compose(text: str, env: Mapping[str, str]) -> YamlDocument:
    """Raises YamlSyntaxError; problems that still leave usable data go to .problems."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, text) from None
    except ReaderError as exc:  # a forbidden character: it has an offset, not a mark
        line = text.count("\n", 0, exc.position) + 1
        raise YamlSyntaxError(line, f"invalid YAML: {exc.reason} ({exc.character!r})") from None
    except RecursionError:  # a document nested hundreds deep: refuse it, do not crash
        raise YamlSyntaxError(1, "invalid YAML: nested too deeply") from None
    doc = YamlDocument(None)
    if root is not None:
        try:
            doc.data = _Builder(doc, env).build(root, "", _line(root))
        except RecursionError:
            raise YamlSyntaxError(_line(root), "invalid YAML: nested too deeply") from None
    return doc


def _syntax_error(exc: yaml.MarkedYAMLError, text: str) -> YamlSyntaxError:
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem or exc.context}"
    if mark is not None:
        message += f" (column {mark.column + 1})"
    if exc.problem and exc.context:
        # The context ("while parsing a flow mapping") often points at the real culprit:
        # an unclosed bracket lines above where the parser gave up.
        where = f" started on line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f"; {exc.context}{where}"
    lines = text.splitlines() or [""]
    if mark and "flow" in (exc.context or "") and "${" in lines[min(mark.line, len(lines) - 1)]:
        # `{api_key: ${KEY}}` reads as a mapping inside a mapping: the commonest slip.
        message += "; inside [ ] or { } a ${...} must be quoted"
    return YamlSyntaxError(mark.line + 1 if mark else None, message)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Builder:
    def __init__(self, doc: YamlDocument, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.constructor = SafeConstructor()
        # Collections being built right now: an alias back into one of them (`&a [*a]`)
        # would otherwise recurse forever.
        self.active: set[int] = set()
        self.budget = MAX_YAML_VALUES

    def problem(self, path: str, line: int, message: str) -> None:
        self.doc.problems.append(YamlProblem(line, path, message))

    def build(self, node: Node, path: str, line: int) -> object:
        # The line of a mapping entry is its key's: for a nested mapping that is the line
        # naming it, which is where a "missing key" report should point.
        self.budget -= 1
        if self.budget < 0:
            # An alias node keeps its anchor's line: point at the top-level entry instead.
            top = self.doc.lines.get(re.split(r"[.\[]", path, maxsplit=1)[0], line)
            message = f"invalid YAML: aliases expand to more than {MAX_YAML_VALUES} values"
            raise YamlSyntaxError(top, message, path)
        self.doc.lines[path] = line
        if isinstance(node, ScalarNode):
            value = self.scalar(node, path)
            return self.expand(value, path, line) if isinstance(value, str) else value
        if id(node) in self.active:
            self.problem(path, line, "recursive YAML alias")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            if isinstance(node, SequenceNode):
                return [self.build(n, f"{path}[{i}]", _line(n)) for i, n in enumerate(node.value)]
            return None
        finally:
            self.active.discard(id(node))

    def scalar(self, node: ScalarNode, path: str) -> object:
        try:
            return self.constructor.construct_object(node)
        except ConstructorError:  # a custom tag (!env, !include): it means nothing here
            message = f"unsupported YAML tag {node.tag!r}"
        except Exception:  # a standard tag on text it cannot read (`!!int abc`) raises anything
            message = f"{node.value!r} is not a valid {node.tag.replace(_STD, '!!')}"
        self.problem(path, _line(node), message)
        return str(node.value)

    def expand(self, text: str, path: str, line: int) -> str:
        def replace(match: re.Match[str]) -> str:
            body, closed = match.group(1), match.group(2)
            if body is None:
                return "${"
            self.doc.templates[path] = text
            name, has_default, default = body.partition(":-")
            if not closed or not _ENV_NAME.fullmatch(name):
                hint = "use ${NAME} or ${NAME:-default}"
                self.problem(path, line, f"invalid reference {match.group(0)!r} ({hint})")
                return ""
            value = self.env.get(name)
            if has_default:
                return value or default  # as in the shell, an empty variable takes the default
            if value is None:
                self.problem(path, line, f"environment variable {name} is not set")
            return value or ""

        return _ENV_REF.sub(replace, text) if "$" in text else text

    def mapping(self, node: MappingNode, path: str) -> dict[str, object]:
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            line = _line(key_node)
            if not isinstance(key_node, ScalarNode):
                self.problem(path, line, "expected a string key, got a collection")
                continue
            key_path = child_path(path, str(key_node.value))
            if key_node.tag == _MERGE_TAG:
                self.problem(key_path, line, "YAML merge keys ('<<') are not supported")
                continue
            key = self.scalar(key_node, key_path)
            if not isinstance(key, str):
                got = describe(key)
                self.problem(key_path, line, f"expected a string key, got {got} (quote it)")
                continue
            if key in result:
                first = self.doc.lines[key_path]
                self.problem(key_path, line, f"duplicate key {key!r} (first at line {first})")
                continue
            result[key] = self.build(value_node, key_path, line)
        return result


def describe(value: object) -> str:
    """A value as an error message shows it: "string 'fast'", "boolean true", "a list"."""
    if isinstance(value, bool):
        return "boolean true" if value else "boolean false"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value[:40] + '…' if len(value) > 40 else value!r}"
    names = {type(None): "null", dict: "a mapping", list: "a list"}
    return names.get(type(value), type(value).__name__)
