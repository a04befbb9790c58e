"""ARCHITECTURE.md's module table, computed from the code: what each row's modules import.

A row names a top-level module (`relay`), a package (`metering`: all of its modules) or a
module inside a package (`observe.metrics`); each module of `proxy` belongs to the row with the
longest name that contains it, so the table's own rows decide its granularity. For each row
the table lists the other rows its modules import and the third-party packages they import
(the standard library left out; imports under `if TYPE_CHECKING:` do not count, as for
import-linter, whose graph library computes them).

    .venv/bin/python -m tests.test_docs --write    # rewrite the table in place
    .venv/bin/python -m tests.import_table         # print the table the code has

keeps each row's "its one job" text, drops rows whose modules are gone and adds a row for
each new top-level module or package, with `?` for its job (the test then asks for one).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
HEADER = "| module | its one job | imports from `proxy` | third-party imports |"
NONE = "—"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Row:
    name: str  # relative to proxy: "relay", "metering", "observe.metrics"
    job: str
    internal: tuple[str, ...]
    external: tuple[str, ...]

    def markdown(self) -> str:
        internal = ", ".join(f"`{n}`" for n in self.internal) or NONE
        external = ", ".join(self.external) or NONE
        return f"| `{self.name}` | {self.job} | {internal} | {external} |"


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        "proxy", include_external_packages=True, exclude_type_checking_imports=True
    )


def modules() -> list[str]:
    """Every module of the package that holds code, relative to `proxy`: neither the root
    (it holds only the version) nor a package whose `__init__` imports nothing (a docstring:
    its modules have rows of their own)."""
    graph = _graph()
    return sorted(
        m.removeprefix("proxy.")
        for m in graph.modules
        if m.startswith("proxy.")
        and (not graph.find_children(m) or graph.find_modules_directly_imported_by(m))
    )


def _ours(module: str) -> bool:
    return module == "proxy" or module.startswith("proxy.")


def row_of(module: str, names: list[str]) -> str | None:
    """The row holding `module`: the longest row name equal to it or a package above it."""
    holding = [n for n in names if module == n or module.startswith(n + ".")]
    return max(holding, key=len) if holding else None


def computed(names: list[str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Row name → (rows it imports, third-party packages it imports)."""
    graph = _graph()
    internal: dict[str, set[str]] = {n: set() for n in names}
    external: dict[str, set[str]] = {n: set() for n in names}
    for module in graph.modules:
        ours = module.startswith("proxy.")
        row = row_of(module.removeprefix("proxy."), names) if ours else None
        if row is None:
            continue  # not ours, or `proxy/__init__`, which holds only the version
        for imported in graph.find_modules_directly_imported_by(module):
            if not _ours(imported):
                top = imported.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    external[row].add(top)
            elif imported != "proxy":  # `from proxy import __version__`
                target = row_of(imported.removeprefix("proxy."), names)
                if target is not None and target != row:
                    internal[row].add(target)
    return {n: (tuple(sorted(internal[n])), tuple(sorted(external[n]))) for n in names}


def unmapped(names: list[str]) -> list[str]:
    return [m for m in modules() if row_of(m, names) is None]


def table_lines(text: str) -> tuple[int, int]:
    """The [start, end) line numbers of the module table (header included)."""
    lines = text.splitlines()
    if HEADER not in lines:
        raise LookupError(f"ARCHITECTURE.md has no table headed {HEADER!r}")
    start = lines.index(HEADER)
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def parse(text: str) -> list[Row]:
    start, end = table_lines(text)
    rows = []
    for line in text.splitlines()[start + 2 : end]:
        cells = [c.strip() for c in _CELL_SPLIT.split(line.strip().strip("|"))]
        name, job, internal, external = cells
        rows.append(Row(name.strip("`"), job, _names(internal), _names(external)))
    return rows


def _names(cell: str) -> tuple[str, ...]:
    return () if cell == NONE else tuple(n.strip().strip("`") for n in cell.split(","))


def expected(rows: list[Row]) -> list[Row]:
    """The table as the code has it: the same rows (less the ones that hold no module, plus
    new top-level ones), each with its imports as computed."""
    present = set(modules())
    names = [r.name for r in rows if any(row_of(m, [r.name]) for m in present)]
    names += sorted({m.split(".")[0] for m in unmapped(names)})
    jobs = {r.name: r.job for r in rows}
    imports = computed(names)
    return [Row(n, jobs.get(n, "?"), *imports[n]) for n in names]


def render(rows: list[Row]) -> str:
    return "\n".join([HEADER, "|---|---|---|---|", *(r.markdown() for r in rows)])


def write() -> None:
    text = ARCHITECTURE.read_text()
    start, end = table_lines(text)
    lines = text.splitlines()
    new = render(expected(parse(text))).splitlines()
    ARCHITECTURE.write_text("\n".join([*lines[:start], *new, *lines[end:]]) + "\n")


if __name__ == "__main__":
    print(render(expected(parse(ARCHITECTURE.read_text()))))
