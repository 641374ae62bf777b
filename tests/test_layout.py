"""The house: imports point one way (no cycle; the library never imports the study; the schema imports
no other study module; runs know nothing of grids or reports), and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medcert_core"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The medcert_core modules a file imports, at module level or inside functions (``from a import b``
    counts a.b when it is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("medcert_core")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medcert_core"):
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), package __init__ facades left out."""
    facades = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    edges = {name: {target for target in targets if target in graph and target not in facades}
             for name, targets in graph.items() if name not in facades}
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return components


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_planted_cycle_is_found():
    graph = import_graph()
    graph["medcert_core.study.settings"] = graph["medcert_core.study.settings"] | {"medcert_core.study.runs.run"}
    assert any("medcert_core.study.settings" in component for component in cycles(graph))


def test_imports_point_one_way():
    graph = import_graph()
    study = {name for name in graph if name.startswith("medcert_core.study")}
    library = {name for name in graph if not name.startswith(("medcert_core.study", "medcert_core.testing"))
               and name not in ("medcert_core.__main__",)}
    assert {name: graph[name] & study for name in library if graph[name] & study} == {}, \
        "the certification library never imports the study"
    assert graph["medcert_core.study.settings"] & study == set(), "the schema is the bottom of the study"
    for name in study:
        if name.startswith("medcert_core.study.runs"):
            assert not {target for target in graph[name] if target.startswith(
                ("medcert_core.study.grid", "medcert_core.study.report", "medcert_core.study.experiment",
                 "medcert_core.study.chapter", "medcert_core.study.workflow"))}, name
        if name.startswith("medcert_core.study.report"):
            assert not {target for target in graph[name] if target.startswith("medcert_core.study.grid")}, name
        if name.startswith("medcert_core.study.grid"):
            assert not {target for target in graph[name] if target.startswith(
                ("medcert_core.study.report", "medcert_core.study.runs.run", "medcert_core.study.experiment"))}, name


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({length} lines)")
    assert long == [], "split into named steps"
