"""Every benchmark and example still runs: its command line parses (``--help``), and every name it imports from the
package exists (imports inside functions included), so a moved or renamed function breaks CI, not a later
measurement."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def package_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every ``from optimum_sparsesched... import name`` / ``import optimum_sparsesched...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optimum_sparsesched"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("optimum_sparsesched")]
    return found


@pytest.mark.parametrize("path", SCRIPTS + EXAMPLES, ids=lambda p: p.name)
def test_every_imported_name_exists(path):
    for module, name in package_imports(path):
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # a submodule; raises if it is not one either


def test_every_benchmark_parses_its_command_line():
    """``--help`` of every script, in one process (the package is imported once)."""
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code in (0, None), (script, exit.code)\n"
            "    else:\n"
            "        raise AssertionError(f'{script}: --help did not exit')\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, SCRIPTS)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
