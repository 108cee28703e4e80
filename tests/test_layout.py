"""The package layout: one folder per stage of the data path, no import cycle (lazy imports inside functions
included), and no long module without a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

import optimum_sparsesched

PACKAGE = Path(optimum_sparsesched.__file__).parent
STAGES = ("pipeline", "obs", "schedule", "formats", "publish", "eval")
MAX_LINES = 250
#: modules allowed above MAX_LINES, with the reason
LONG_MODULES = {
    "config.py": "every option of a run in one class, with its documentation and validation",
    "pipeline/residency.py": "the device-memory accounting is documented term by term beside the code that applies it",
    "publish/model_card.py": "the card's metadata, tables and plot are built from one config in one place",
    "formats/compact.py": "the layout, its encoder and its checked decoder side by side, so every check reads next to "
                          "the layout rule it enforces",
}


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


def test_stages_below_do_not_import_the_glue_above():
    """The stages never import the transformers glue, the block loop, the CLI or the package root."""
    above = {"optimum_sparsesched", "optimum_sparsesched.quantizer", "optimum_sparsesched.sequential",
             "optimum_sparsesched.cli"}
    for module, imports in import_graph().items():
        if module.split(".")[1:2] and module.split(".")[1] in STAGES and "metrics" not in module:
            assert not imports & above, (module, imports & above)


def test_long_modules_have_a_reason():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES or rel in LONG_MODULES, f"{rel}: {lines} lines and no reason in LONG_MODULES"
