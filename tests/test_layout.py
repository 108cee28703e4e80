"""The package layout: the stages in the order the README's architecture section gives, each importing only from
itself and the stages below it (lazy imports inside functions included), no import cycle, and no module over 300
lines."""

from __future__ import annotations

import ast
from pathlib import Path

import optimum_sparsesched

PACKAGE = Path(optimum_sparsesched.__file__).parent
#: the stages from the top (the command line) to the bottom (one layer's OBS math), as the README lists them; a module
#: may import from its own stage and from the stages after it, never from one before it
LAYERS = (
    ("cli", ("cli",)),
    ("entry points", ("__init__", "quantizer", "streaming")),
    ("publish", ("publish",)),
    ("eval", ("eval",)),
    ("block loop", ("sequential",)),
    ("options", ("config", "config_checks", "results")),
    ("schedule", ("schedule",)),
    ("formats", ("formats",)),
    ("pipeline", ("pipeline",)),
    ("obs", ("obs",)),
    ("utilities", ("version", "network", "logs")),
)
STAGES = ("cli", "publish", "eval", "schedule", "formats", "pipeline", "obs")
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import submodule` imports the submodule
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "optimum_sparsesched.sequential" in graph["optimum_sparsesched.quantizer"]  # the checker sees edges
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle(graph) is None


def test_one_folder_per_stage():
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{stage}/ needs a docstring"


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of a package module (``optimum_sparsesched.x.y`` -> its top-level part ``x``)."""
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, (_, parts) in enumerate(LAYERS) if part in parts)


def test_every_module_belongs_to_a_stage():
    for module in import_graph():
        layer_of(module)  # raises StopIteration for a module of no stage


def test_imports_only_go_down_the_stages():
    assert layer_of("optimum_sparsesched.cli.commands") < layer_of("optimum_sparsesched.obs.prune")
    upward = [(module, imported) for module, imports in import_graph().items() for imported in imports
              if layer_of(imported) < layer_of(module)]
    assert upward == []


def test_no_module_is_long():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE).as_posix()}: {lines} lines (at most {MAX_LINES})"


def test_every_data_file_of_the_package_is_installed():
    """A file the package reads at run time (calibration text, the metric's script, the C source of the sparse
    kernel) is in pyproject's package-data, so that a wheel carries it, not only an editable install."""
    import fnmatch

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["optimum_sparsesched"]
    data = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data and "formats/sparse_kernel.c" in data
    missing = [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
