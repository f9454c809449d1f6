"""The package has no import circle: module-level imports between dnfer's modules form a DAG.

A circle (registry -> methods -> registry, as once existed) makes import order matter and forces
call sites to remember set-up calls. Imports inside functions and under ``TYPE_CHECKING`` are
lazy and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph() -> dict[str, set[str]]:
    """``module -> dnfer modules it imports at module level``."""
    mods: dict[str, Path] = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.parse(p.read_text()).body:
            body = [node]
            if isinstance(node, ast.If):
                test = node.test
                if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                    continue
                body = node.body
            for n in body:
                if isinstance(n, ast.Import):
                    graph[m] |= {a.name for a in n.names if a.name in mods}
                elif isinstance(n, ast.ImportFrom) and n.module and n.module in mods:
                    if n.module != m:  # a package importing its own submodules (``from . import x``)
                        graph[m].add(n.module)
                    graph[m] |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_a_planted_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_dnfer_has_no_import_circle() -> None:
    graph = module_graph()
    assert "dnfer.engine.trainer" in graph and graph["dnfer.engine.trainer"]  # the scan sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
