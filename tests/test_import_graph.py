"""The package's modules import each other only downwards: the import graph of src/g2vlm_hf (read with ast, every
import at any depth, lazy ones inside functions included) has no cycle, and nothing imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "g2vlm_hf"


def module_name(path: Path) -> str:
    parts = ["g2vlm_hf", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports (a `from X import name` counts `X.name` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the list of its modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the edges from a module to the `__init__` of a package above it: importing `a.b` runs
    `a/__init__` first anyway, so those edges say nothing about layering (the package `__init__`s re-export)."""
    return {name: {t for t in targets if not name.startswith(f"{t}.")} for name, targets in graph.items()}


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "g2vlm_hf.model_loading" in graph["g2vlm_hf.cli.reconstruct"]  # `from .. import model_loading`
    assert "g2vlm_hf.inputs.video" in graph["g2vlm_hf.inputs.views"]
    assert "g2vlm_hf.processing.image_io" in graph["g2vlm_hf.inputs.views"]  # imported inside a function


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(without_package_inits(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", ["g2vlm_hf.cli", "g2vlm_hf_launcher"])
def test_nothing_imports_the_command_line(layer):
    importers = {
        name
        for name, targets in import_graph().items()
        if not name.startswith(layer) and any(t == layer or t.startswith(f"{layer}.") for t in targets)
    }
    assert importers == set()


@pytest.mark.parametrize("module", ["g2vlm_hf.inputs", "g2vlm_hf.model_loading"])
def test_the_lower_layers_import_no_model_run_or_command(module):
    graph = import_graph()
    above = ("g2vlm_hf.cli", "g2vlm_hf.reconstruction", "g2vlm_hf.chunked", "g2vlm_hf.evaluation", "g2vlm_hf.export")
    for name, targets in graph.items():
        if name == module or name.startswith(f"{module}."):
            assert not {t for t in targets if t.startswith(above)}, name


def test_the_launchers_parser_uses_only_the_standard_library():
    import sys

    tree = ast.parse((PACKAGE / "cli" / "parser.py").read_text())
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}


def test_the_parsers_dtypes_are_the_loaders():
    from g2vlm_hf.cli.parser import DTYPE_CHOICES
    from g2vlm_hf.model_loading import DTYPES

    assert DTYPE_CHOICES == DTYPES
