"""No import cycles in `pagoda/`: every module's imports, at any depth, form a DAG.

Every `import` and `from ... import` of a `pagoda` module counts, wherever it sits (top level,
inside a function, under `if TYPE_CHECKING:`): a lazy import still ties two modules together.
`from package import name` counts as importing `package.name` when that is a module, else
`package`. Run `python -m pytest tests/test_import_cycles.py` to see any cycle, module by module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pagoda"


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module name -> the pagoda modules it imports."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [
                    resolve(alias.name) for alias in node.names if alias.name.startswith("pagoda")
                ]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                if base.startswith("pagoda"):
                    targets = [
                        f"{base}.{alias.name}"
                        if f"{base}.{alias.name}" in modules
                        else resolve(base)
                        for alias in node.names
                    ]
            graph[name].update(target for target in targets if target and target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_two_module_cycle() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]


def test_pagoda_has_no_import_cycles() -> None:
    graph = import_graph()
    assert "pagoda.engine.scheduler" in graph and graph["pagoda.engine.scheduler"]
    report = [
        " <-> ".join(component)
        + "".join(f"\n    {m} -> {sorted(graph[m] & set(component))}" for m in component)
        for component in cycles(graph)
    ]
    assert not report, "import cycles:\n" + "\n".join(report)
