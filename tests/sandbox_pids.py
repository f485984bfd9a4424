"""Host pids of processes inside an isolated sandbox.

A sandbox has its own PID namespace, so ``echo $$`` inside it prints a pid of
that namespace (2, 3, ...), which on the host names some unrelated process.
Tests that check "this process is gone" translate first: the host process in
the sandbox's PID namespace whose innermost pid is the one printed (``NSpid``
in /proc/<pid>/status). The server's record names the process it reaches the
sandbox through (`SandboxRecord.init_pid`: its monitor, outside the sandbox's
PID namespace), whose ``pid_for_children`` is the sandbox's.

The container's init is not dumpable (`container._not_dumpable`), and it never
exec'd after entering the sandbox's user namespace, so its memory belongs to the
host's: its ``/proc/<pid>/ns`` links refuse everyone but root (ptrace's access
check). A normal user tells its namespace from its parent instead: a process is
born in its parent's ``pid_for_children``, and the monitor that forks the init
never changes its own afterwards. ``/proc/<pid>/status`` (``NSpid``, ``PPid``)
is readable by all.
"""

from __future__ import annotations

import os


def _pid_ns(pid: int, which: str = "pid") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{which}")
    except OSError:
        return None


def _status(pid: int, field: str) -> list[int] | None:
    """The numbers of ``field`` (``NSpid``, ``PPid``) in /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return [int(v) for v in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def _innermost(pid: int) -> int | None:
    nspid = _status(pid, "NSpid")
    return nspid[-1] if nspid else None


def _in_pid_ns(pid: int, ns: str) -> bool:
    """True if ``pid`` is in the PID namespace ``ns`` (a link's text, ``pid:[...]``)."""
    mine = _pid_ns(pid)
    if mine is not None:
        return mine == ns
    if not os.path.exists(f"/proc/{pid}"):
        return False
    # its ns links refuse us (not dumpable, see above): the namespace it was born in
    ppid = _status(pid, "PPid")
    if not ppid:
        return False
    return _pid_ns(ppid[0], "pid_for_children") == ns


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
        if not _in_pid_ns(pid, ns):
            continue
        inner = _innermost(pid)
        if inner in wanted:
            found[inner] = pid
    missing = wanted - set(found)
    assert not missing, f"no host process for sandbox pids {sorted(missing)}"
    return [found[p] for p in ns_pids]
