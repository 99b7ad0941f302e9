"""resonate_sqlite is a library: it imports nothing of Tether, its tests
neither, and the snippet its README shows runs as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "resonate_sqlite"
TESTS = ROOT / "tests" / "resonate_sqlite"
TETHER = ("core", "api", "plugins")


def imported_modules(source: str, package: str) -> list[str]:
    """Every module ``source`` (a file of ``package``) imports, at any depth,
    as absolute names (relative imports resolved), with each imported name."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] if module else []
            names += [".".join(filter(None, [module, alias.name])) for alias in node.names]
    return names


def file_imports(path: Path) -> list[str]:
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    return imported_modules(path.read_text(), package)


def tether_imports(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in file_imports(path)
        if name in forbidden or name.startswith(tuple(f"{f}." for f in forbidden))
    ]


def test_the_walk_sees_every_kind_of_import() -> None:
    source = (
        "import core.plugins\n"
        "from api import app\n"
        "def later():\n"
        "    import plugins\n"
        "    from .. import core\n"
        "from .wire import text\n"
    )
    assert imported_modules(source, "resonate_sqlite") == [
        "core.plugins",
        "api",
        "api.app",
        "resonate_sqlite.wire",
        "resonate_sqlite.wire.text",
        "plugins",
        "core",
    ]


def test_the_package_imports_nothing_of_tether() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8
    assert tether_imports(files, TETHER) == []


def test_its_tests_import_nothing_of_tether() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert tether_imports(files, (*TETHER, "tests.conftest")) == []


def readme_snippet() -> str:
    text = (PACKAGE / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md shows no python snippet"
    return str(blocks[0])


@pytest.mark.parametrize("run", ["first", "again"])
def test_the_readme_snippet_runs(tmp_path_factory: pytest.TempPathFactory, run: str) -> None:
    """The first run computes the result; a second run in the same directory
    finds the finished workflow in the file."""
    workdir = tmp_path_factory.getbasetemp() / "readme-snippet"
    workdir.mkdir(exist_ok=True)
    script = workdir / "snippet.py"
    script.write_text(readme_snippet())
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello WORLD\n"
    assert (workdir / "app.db").exists()
