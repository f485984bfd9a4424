"""The package's rooms depend one way (DESIGN.md): an AST scan of every import that runs.

core <- task_runner / worker / sessions / bundles <- cli, and `local` stands
alone: the adapter reaches it only through the real modal client (and
`core.targets` starts it embedded).  The code that runs inside a sandbox
imports only the standard library, and one module calls the modal SDK.
"""

from __future__ import annotations

import sys

import import_graph as imports
import pytest

P = imports.PACKAGE
GRAPH = imports.graph()
MODULE_LEVEL = imports.graph(module_level_only=True)

#: Each room and the rooms of the package it may import (besides itself).
#: The worker's per_step mode runs the task runner; its pools store bundles.
ALLOWED: dict[str, set[str]] = {
    "core": {"local"},
    "local": set(),
    "events": set(),
    "storage": {"core"},
    "status": {"core"},
    "task_runner": {"core", "events", "storage"},
    "sessions": {"core", "events"},
    "bundles": {"core", "storage"},
    "worker": {"core", "events", "storage", "status", "bundles", "task_runner"},
    "decorators": {"core", "worker"},
    "per_step": {"worker"},
    "cli": {"core", "local", "events", "storage", "status", "worker", "bundles", "task_runner"},
}


def room(module: str) -> str:
    """The first name under the package (`prefect_modal.core.spec` -> `core`); the face
    and `_moved` (which hand names on) are rooms of their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _crossings(source_room: str) -> list[str]:
    bad = []
    for module, edges in GRAPH.items():
        if room(module) != source_room:
            continue
        for edge in imports.internal(edges):
            target = room(edge.target)
            if target != source_room and target not in ALLOWED[source_room]:
                bad.append(f"{module}:{edge.line} imports {edge.target}")
    return bad


def test_every_module_has_a_room() -> None:
    rooms = {room(m) for m in GRAPH}
    assert rooms - {"__init__", "_moved"} == set(ALLOWED), rooms


@pytest.mark.parametrize("source_room", sorted(ALLOWED))
def test_rooms_import_only_the_rooms_below_them(source_room: str) -> None:
    assert _crossings(source_room) == []


def test_core_imports_no_mode() -> None:
    modes = {"task_runner", "worker", "sessions", "bundles", "cli", "decorators", "per_step"}
    assert not ALLOWED["core"] & modes
    assert _crossings("core") == []


def test_local_imports_nothing_outside_itself() -> None:
    assert ALLOWED["local"] == set()
    assert _crossings("local") == []


@pytest.mark.parametrize("module", [f"{P}.task_runner.remote", f"{P}.task_runner.remote_context"])
def test_sandbox_side_code_imports_only_the_standard_library_at_module_level(module: str) -> None:
    top_level = {e.target.partition(".")[0] for e in MODULE_LEVEL[module]}
    assert top_level, f"{module} has no imports: is the scan reading it?"
    assert top_level - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_one_module_calls_the_modal_sdk() -> None:
    callers = {
        module
        for module, edges in GRAPH.items()
        if room(module) != "local"
        and any(e.target.partition(".")[0] in {"modal", "modal_proto", "grpclib"} for e in edges)
    }
    assert callers == {f"{P}.core.modal_api"}


def test_no_import_circle_at_run_time() -> None:
    assert imports.cycles(GRAPH) == []


def test_the_scan_sees_circles_and_rooms() -> None:
    """The checks above would pass on an empty graph: prove the scan finds what it looks for."""
    edges = imports.internal(GRAPH[f"{P}.task_runner.call"])
    assert {f"{P}.core.modal_api", f"{P}.task_runner.warm"} <= {e.target for e in edges}
    fake = {
        "a": [imports.Import("a", f"{P}.b", 1, True)],
        f"{P}.b": [imports.Import(f"{P}.b", f"{P}.c", 1, False)],
        f"{P}.c": [imports.Import(f"{P}.c", f"{P}.b", 1, True)],
    }
    assert imports.cycles(fake) == [[f"{P}.b", f"{P}.c"]]
    assert room(f"{P}.core.spec") == "core" and room(P) == "__init__"
