"""Starting and killing sandbox processes on this machine.

Each sandbox (and each ``exec`` in it) runs as its own session / process group,
so one ``killpg`` ends what it started. Three more guards make sure nothing
outlives the server:

* ``PR_SET_PDEATHSIG`` (SIGKILL) in the child, so the sandbox dies if the server
  dies. Linux ties it to the *thread* that forked, which is the server's event
  loop thread; it lives exactly as long as the server.
* a marker variable in the sandbox's environment (inherited by everything it
  starts, unless the code scrubs it), so `kill_tree` also finds processes that
  called ``setsid`` or were re-parented to init;
* the walk of ``/proc`` for descendants of the main process.

Why not cgroups: they need privileges this project cannot assume (CI, laptops).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import resource
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence

MARKER_ENV = "PREFECT_MODAL_LOCAL_MARKER"
_PR_SET_PDEATHSIG = 1

try:  # resolved before any fork: a forked child must not dlopen
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - non-glibc systems
    _libc = None


def make_preexec(rlimit_as_bytes: int | None) -> Callable[[], None]:
    """Build the function the child runs between fork and exec."""
    parent = os.getpid()
    libc = _libc

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the server died before prctl took effect
                os._exit(137)
        if rlimit_as_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as_bytes, rlimit_as_bytes))

    return preexec


async def spawn(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    rlimit_as_bytes: int | None = None,
    stdin: bool = True,
    stdout: bool = True,
    stderr: bool = True,
    merge_stderr: bool = False,
) -> asyncio.subprocess.Process:
    """Start ``args`` in a new session with pipes for the fds asked for."""
    pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    err = asyncio.subprocess.STDOUT if merge_stderr else (pipe if stderr else null)
    return await asyncio.create_subprocess_exec(
        *args,
        stdin=pipe if stdin else null,
        stdout=pipe if stdout else null,
        stderr=err,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=make_preexec(rlimit_as_bytes),
        close_fds=True,
    )


def _proc_pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            # the command name may contain spaces and parens; fields start after the last ')'
            fields = stat[stat.rindex(b")") + 2 :].split()
            out[pid] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (not including it)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppid_map().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in found:
                found.add(c)
                stack.append(c)
    return found


def marked_pids(marker_prefix: str) -> set[int]:
    """Live processes whose environment has ``MARKER_ENV`` starting with ``marker_prefix``."""
    needle = f"{MARKER_ENV}={marker_prefix}".encode()
    me = os.getpid()
    found: set[int] = set()
    for pid in _proc_pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for entry in env.split(b"\0"):
            if entry.startswith(needle):
                found.add(pid)
                break
    return found


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def killpg(pgid: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process group, ignoring one that is already gone."""
    if pgid is None or pgid <= 1:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int | None, marker_prefix: str | None, sig: int = signal.SIGKILL) -> None:
    """Kill a sandbox's process group, its descendants and every marked process.

    Blocking (reads /proc): run it in a thread from async code when it matters.
    """
    victims: set[int] = set()
    if pid is not None:
        victims |= descendants(pid)
        killpg(pid, sig)  # the main process leads its own session: pgid == pid
    if marker_prefix:
        victims |= marked_pids(marker_prefix)
    if pid is not None:
        victims.add(pid)
    for v in victims:
        _kill(v, sig)
        try:
            os.killpg(v, sig)  # v may lead its own group after setsid
        except (ProcessLookupError, PermissionError, OSError):
            pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return False


__all__ = [
    "MARKER_ENV",
    "descendants",
    "kill_tree",
    "killpg",
    "make_preexec",
    "marked_pids",
    "pid_alive",
    "spawn",
]
