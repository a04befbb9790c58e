"""The docs cannot drift from the code: each table that restates the code is checked against
it, every relative link resolves, and the README stays short.

- ARCHITECTURE.md's module table ↔ the imports in `proxy/` (`tests/import_table.py`;
  `python -m tests.test_docs --write` rewrites the table in place);
- docs/CONFIG.md's key table ↔ the keys the config loader accepts;
- docs/OBSERVABILITY.md's metric and alert tables ↔ `proxy/observe/metrics.py` and
  `deploy/prometheus/alerts.yml`;
- the README's command table ↔ every `sluicegate` command and flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from proxy import cli
from proxy.config import (
    Budget,
    ClientKey,
    Config,
    Cooldown,
    Outliers,
    Price,
    Route,
    ServerSettings,
    StateSettings,
    Target,
    Timeouts,
    Tls,
    Upstream,
    UsageHeaders,
    parse_config,
)
from proxy.observe.metrics import Metrics
from proxy.observe.words import Series
from tests import import_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 150
WRITE = "python -m tests.test_docs --write"


def section(path: Path, heading: str) -> str:
    """The text under a heading, up to the next `#` or `##` heading."""
    text = path.read_text()
    match = re.search(rf"^(#+) {re.escape(heading)}\n(.*?)(?=^#{{1,{2}}} |\Z)", text, re.M | re.S)
    assert match, f"{path.relative_to(ROOT)} has no heading {heading!r}"
    return match.group(2)


def first_cells(text: str) -> list[str]:
    """The backticked first cell of each table row: | `name` | ..."""
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


# --- ARCHITECTURE.md ---------------------------------------------------------------------


def test_the_architecture_table_lists_what_each_module_imports() -> None:
    text = import_table.ARCHITECTURE.read_text()
    table = import_table.parse(text)
    want = import_table.expected(table)
    shown = {r.name: r for r in table}
    problems = [
        f"  {r.name}: the table says {_imports(shown[r.name])}, the code {_imports(r)}"
        if r.name in shown
        else f"  {r.name}: no row (a new module or package)"
        for r in want
        if shown.get(r.name) != r
    ]
    problems += [f"  {name}: no such module any more" for name in shown.keys() - {*map(_n, want)}]
    problems += [f"  {r.name}: describe its one job (now '?')" for r in want if r.job == "?"]
    assert not problems, (
        "ARCHITECTURE.md's module table disagrees with the code:\n"
        + "\n".join(problems)
        + f"\nRewrite it in place with `{WRITE}` (then describe any '?' job); the expected "
        + "table is:\n\n"
        + import_table.render(want)
    )


def _n(row: import_table.Row) -> str:
    return row.name


def _imports(row: import_table.Row) -> str:
    return f"[{', '.join(row.internal)}] + [{', '.join(row.external)}]"


# --- docs/CONFIG.md ----------------------------------------------------------------------

# Where each config type sits in routes.yaml. The loader accepts exactly a type's fields as
# keys (`Checks.section`), so the keys to document follow from these types.
SECTIONS: dict[str, type[object]] = {
    "server": ServerSettings,
    "upstreams.NAME": Upstream,
    "upstreams.NAME.timeouts": Timeouts,
    "upstreams.NAME.cooldown": Cooldown,
    "upstreams.NAME.usage_headers": UsageHeaders,
    "upstreams.NAME.tls": Tls,
    "routes[]": Route,
    "routes[].outliers": Outliers,
    "routes[].targets[]": Target,
    "routes[].fallbacks[]": Target,
    "pricing.MODEL": Price,
    "keys.NAME": ClientKey,
    "keys.NAME.budget": Budget,
    "state": StateSettings,
}


def _keys_of(cls: type[object]) -> list[dataclasses.Field[object]]:
    # As Checks.section: the init fields, less the ones the loader fills in itself.
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in ("name", "source")]


def config_keys() -> set[str]:
    keys = set()
    for prefix, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in _keys_of(cls):
            path = f"{prefix}.{f.name}"
            if path in SECTIONS or f"{path}[]" in SECTIONS:
                continue
            nested = [hints[f.name], *typing.get_args(hints[f.name])]
            assert not any(dataclasses.is_dataclass(t) for t in nested), (
                f"{path} holds a {hints[f.name]}: add where it sits to SECTIONS in {__file__}"
            )
            keys.add(path)
    return keys


def test_the_config_sections_cover_every_top_level_key() -> None:
    tops = {f.name for f in _keys_of(Config)}
    mapped = {re.split(r"[.\[]", prefix)[0] for prefix in SECTIONS}
    assert tops == mapped, f"add the new top-level section to SECTIONS in {__file__}"


def test_config_md_documents_every_key_the_loader_accepts() -> None:
    documented = first_cells(section(DOCS / "CONFIG.md", "Every key"))
    assert len(documented) == len(set(documented)), "a key is documented twice"
    accepted = config_keys()
    missing, unknown = sorted(accepted - set(documented)), sorted(set(documented) - accepted)
    assert not missing, f"keys the loader accepts, missing from docs/CONFIG.md: {missing}"
    assert not unknown, f"keys docs/CONFIG.md documents that the loader refuses: {unknown}"


# --- docs/OBSERVABILITY.md ---------------------------------------------------------------


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Name → (type, labels) of every metric the metrics observer defines."""
    config = parse_config(
        "upstreams: {up: {base_url: 'http://up'}}\n"
        "routes: [{model: r, targets: [{upstream: up, model: m}]}]\n",
        "routes.yaml",
        {},
    )
    meter = Metrics(config, CollectorRegistry())
    kept = [v.metric if isinstance(v, Series) else v for v in vars(meter).values()]
    wrappers = [v for v in kept if isinstance(v, MetricWrapperBase)]
    return {
        # prometheus_client keeps a counter's name without its `_total`.
        w._name + ("_total" if w._type == "counter" else ""): (w._type, tuple(w._labelnames))
        for w in wrappers
    }


def test_observability_md_lists_every_metric_with_its_type_and_labels() -> None:
    rows = re.findall(
        r"^\| `(sluicegate_\w+)` \| (\w+) \| ([\w, ]*) \|",
        section(DOCS / "OBSERVABILITY.md", "Metrics"),
        re.M,
    )
    documented = {name: (kind, tuple(re.findall(r"\w+", labels))) for name, kind, labels in rows}
    assert len(documented) == len(rows), "a metric is documented twice"
    assert documented == defined_metrics()


def test_observability_md_lists_every_alert_rule() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    documented = first_cells(section(DOCS / "OBSERVABILITY.md", "Dashboard and alerts"))
    assert documented == alerts


# --- README.md ---------------------------------------------------------------------------


def cli_commands() -> dict[str, list[str]]:
    """Every `sluicegate` command → its long flags (`""` is the bare command)."""
    parser = cli._parser()
    commands = {"": _flags(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands |= {name: _flags(sub) for name, sub in action.choices.items()}
    return commands


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    ]


def test_the_readme_command_table_lists_every_command_and_flag() -> None:
    rows = [
        line for line in section(ROOT / "README.md", "Commands").splitlines()
        if line.startswith("| `sluicegate")
    ]  # fmt: skip
    missing = []
    for command, flags in cli_commands().items():
        head = rf"{re.escape(command)}\b" if command else "--"
        own = [r for r in rows if re.match(rf"\| `sluicegate {head}", r)]
        if command and not own:
            missing.append(f"sluicegate {command}")
        missing += [f"sluicegate {command} {f}" for f in flags if not any(f in r for r in own)]
    assert missing == []


def test_the_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference to docs/"


# --- links -------------------------------------------------------------------------------

DOCUMENTS = sorted({*ROOT.glob("*.md"), *DOCS.glob("*.md"), ROOT / "tests" / "README.md"})
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces → `-`."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", _FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in slugs(resolved):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A title\n")
    doc = tmp_path / "b.md"
    doc.write_text(
        "[ok](a.md#a-title) [gone](nope.md) [anchor](a.md#nope) [web](https://x.invalid/)\n"
        "```\n[in code](nope.md)\n```\n"
    )
    assert broken_links(doc) == ["nope.md: no such file", "a.md#nope: no heading with that anchor"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {WRITE}")
    import_table.write()
    print(f"rewrote the module table in {import_table.ARCHITECTURE.relative_to(ROOT)}")
