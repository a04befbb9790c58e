"""The tools that keep the code honest run as part of the suite, so CI fails on any of them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: install the test extra (pip install -e '.[test]')"
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(
    "cmd",
    [
        ("ruff", "check", "proxy", "tests", "bench"),
        ("ruff", "format", "--check", "proxy", "tests", "bench"),
        ("mypy",),
        ("lint-imports",),
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict", "import-contracts"],
)
def test_static_check_passes(cmd: tuple[str, ...]) -> None:
    result = _run(_tool(cmd[0]), *cmd[1:])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_stays_small() -> None:
    modules = list((ROOT / "proxy").rglob("*.py"))  # the packages' modules too
    assert {"app.py", "upstream.py", "knobs.py"} <= {p.name for p in modules}
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_each_package_is_imported_through_one_path() -> None:
    """The config's types and loader are imported as `proxy.config` everywhere outside that
    package, so there is one import path per concept (its submodules are its own business)."""
    pattern = re.compile(r"^\s*(?:from|import)\s+proxy\.config\.\w+", re.MULTILINE)
    files = [*(ROOT / "proxy").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    files += list((ROOT / "bench").glob("*.py"))
    outside = [p for p in files if "config" not in p.relative_to(ROOT).parts[1:-1]]
    assert len(outside) > 50  # the walk found the tree
    offenders = [str(p.relative_to(ROOT)) for p in outside if pattern.search(p.read_text())]
    assert offenders == []
