"""Imports inside the package run one way: no module of r2d2ds (kernels/ included) imports, at the top or late
inside a function, a module that imports it back. A late import that hides a cycle works until someone moves it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installs as r2d2ds.kernels (pyproject's package-dir)
        parts = ["r2d2ds", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports anywhere in its file}; a submodule importing its own parent package
    (e.g. r2d2ds.distributed.collectives -> r2d2ds.distributed) is not an edge: the parent loads first."""
    files = {_module(p): p for folder in ("r2d2ds", "kernels") for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in files and n != mod and not mod.startswith(n + ".")}
        graph[mod] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return cycles


def test_find_cycles_sees_a_late_import_cycle():
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]


def test_package_imports_run_one_way():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (move the shared piece down into its own module): " + \
        "; ".join(" -> ".join(c) for c in cycles)
