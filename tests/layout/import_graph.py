"""The package's import graph, read from its source (no module is imported).

An edge ``a -> b`` is an import in module ``a`` that runs: at module level or
inside a function, never under ``if TYPE_CHECKING:``.  ``from p import n``
names the submodule ``p.n`` when there is one, else the module ``p``; the
parents Python imports on the way are not edges (importing ``a.b.c`` runs
``a/__init__`` and ``a/b/__init__`` first, and every module would then
depend on the package's face).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "prefect_modal"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (absolute, dotted)
    line: int
    module_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    top = {id(n) for n in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.append(sub if sub in known else module)
        level = id(node) in top
        found += [Import(name, t, node.lineno, level) for t in targets]
    return found


def graph(module_level_only: bool = False) -> dict[str, list[Import]]:
    """Every module of the package with the imports it runs."""
    found = modules()
    known = set(found)
    return {
        name: [i for i in imports_of(name, path, known) if not module_level_only or i.module_level]
        for name, path in found.items()
    }


def internal(edges: list[Import]) -> list[Import]:
    return [i for i in edges if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


def cycles(edges: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    adjacency = {
        m: sorted({i.target for i in internal(e) if i.target in edges}) for m, e in edges.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in adjacency:
        if node not in index:
            visit(node)
    return found


def longest_chain(edges: dict[str, list[Import]], start: str) -> list[str]:
    """The longest path of imports from `start` (the graph has no cycle)."""
    adjacency = {
        m: sorted({i.target for i in internal(e) if i.target in edges}) for m, e in edges.items()
    }
    best: dict[str, list[str]] = {}

    def walk(node: str) -> list[str]:
        if node not in best:
            tails = [walk(n) for n in adjacency[node]]
            best[node] = [node, *max(tails, key=len, default=[])]
        return best[node]

    return walk(start)
