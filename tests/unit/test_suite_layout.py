"""The suite's own rule: shared test code lives in modules not named ``test_*.py``
(fakes/, conftest, helpers beside their tests), so neither a test module nor a bench
script imports a test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BENCH = TESTS.parent / "bench"


def _imported_test_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        # Ours only: a relative import, or one from the tests package.
        ours = node.level > 0 if isinstance(node, ast.ImportFrom) else False
        found += [
            n
            for n in names
            if (ours or n.startswith("tests.")) and n.rsplit(".", 1)[-1].startswith("test_")
        ]
    return found


def test_no_module_imports_a_test_module() -> None:
    offenders = {
        str(p): mods
        for p in sorted([*TESTS.rglob("*.py"), *BENCH.rglob("*.py")])
        if (mods := _imported_test_modules(p))
    }
    assert offenders == {}


def test_the_check_sees_both_import_forms(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "from .test_x import a\nimport tests.unit.test_y\nfrom tests.fakes import b\n"
        "from aiohttp.test_utils import c\n"
    )
    assert _imported_test_modules(f) == ["test_x", "tests.unit.test_y"]
