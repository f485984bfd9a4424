"""Host pids of processes inside an isolated sandbox.

A sandbox has its own PID namespace, so ``echo $$`` inside it prints a pid of
that namespace (2, 3, ...), which on the host names some unrelated process.
Tests that check "this process is gone" translate first: the host process in
the sandbox's PID namespace whose innermost pid is the one printed (``NSpid``
in /proc/<pid>/status). The server's record names the process it reaches the
sandbox through (`SandboxRecord.init_pid`: its monitor, outside the sandbox's
PID namespace), whose ``pid_for_children`` is the sandbox's.
"""

from __future__ import annotations

import os


def _pid_ns(pid: int, which: str = "pid") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{which}")
    except OSError:
        return None


def _innermost(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def host_pids(init_pid: int, ns_pids: list[int]) -> list[int]:
    """The host pids of ``ns_pids`` (pids inside the sandbox the server reaches through
    ``init_pid``)."""
    ns = _pid_ns(init_pid, "pid_for_children")
    assert ns is not None, f"the sandbox's init {init_pid} is gone"
    wanted = set(ns_pids)
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if _pid_ns(pid) != ns:
            continue
        inner = _innermost(pid)
        if inner in wanted:
            found[inner] = pid
    missing = wanted - set(found)
    assert not missing, f"no host process for sandbox pids {sorted(missing)}"
    return [found[p] for p in ns_pids]
