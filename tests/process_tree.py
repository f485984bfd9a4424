"""Every process a program started, found by pid through /proc, for "nothing left" checks.

A pid alone can be reused once its process is gone; (pid, start time) cannot.
Imported by the CLI's signal tests and the benchmarks' smoke tests (the rootdir
conftest puts `tests/` on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing ')'.
    return [str(pid), "comm", *text[text.rindex(")") + 2 :].split()]


def descendants(root: int) -> set[Proc]:
    """`root`'s children, their children, ... (in any session or process group)."""
    children: dict[int, list[Proc]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[3]), []).append((int(entry), int(fields[21])))
    found: set[Proc] = set()
    todo = [root]
    while todo:
        for proc in children.get(todo.pop(), []):
            if proc not in found:
                found.add(proc)
                todo.append(proc[0])
    return found


def children(root: int) -> set[Proc]:
    """`root`'s own children (a subset of `descendants`)."""
    found: set[Proc] = set()
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[3]) == root:
            found.add((int(entry), int(fields[21])))
    return found


def alive(proc: Proc) -> bool:
    """True while that very process (not a later one with its pid) runs and is no zombie."""
    fields = _stat(proc[0])
    return fields is not None and int(fields[21]) == proc[1] and fields[2] != "Z"


def describe(procs: set[Proc]) -> list[str]:
    out = []
    for pid, _ in sorted(procs):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:
            cmd = "?"
        out.append(f"{pid}: {cmd}")
    return out
