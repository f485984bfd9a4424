"""Starting and killing sandbox processes on this machine.

Each sandbox (and each ``exec`` in it) runs as its own session / process group,
so one ``killpg`` ends what it started. Three more guards make sure nothing
outlives the server:

* ``PR_SET_PDEATHSIG`` (SIGKILL) in the child, so the sandbox dies if the server
  dies. Linux ties it to the *thread* that forked, which is the server's event
  loop thread; it lives exactly as long as the server. It is set by exec'ing
  through util-linux ``setpriv --pdeathsig KILL`` where available: a Python
  ``preexec_fn`` forces a full ``fork()`` of the (large) server process instead
  of ``vfork()`` and costs ~20 ms per sandbox, a third of a tiny sandbox's life.
  Without ``setpriv``, or when a memory limit must be set, ``preexec_fn`` does it.
* a marker variable in the sandbox's environment (inherited by everything it
  starts, unless the code scrubs it), so `kill_tree` also finds processes that
  called ``setsid`` or were re-parented to init;
* the walk of ``/proc`` for descendants of the main process.

Processes are started with a plain `subprocess.Popen` (vfork + exec); `Child`
feeds their pipes into `OutputBuffer`s through the event loop and notices the
exit through a pidfd, then kills what is left of the group *before* reaping
the entrypoint (while it is a zombie its group id cannot be reused).

Limits (memory, cpu, pids) are cgroups where the machine allows (`cgroups`): a
process joins its sandbox's groups first thing in ``preexec_fn`` (so ``setpriv``
is not used then). This module is process hygiene, not isolation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Protocol

from .streams import OutputBuffer

MARKER_ENV = "PREFECT_MODAL_LOCAL_MARKER"
log = logging.getLogger("prefect_modal.local")
_PR_SET_PDEATHSIG = 1

try:  # resolved before any fork: a forked child must not dlopen
    _libc: ctypes.CDLL | None = ctypes.CDLL(
        ctypes.util.find_library("c") or "libc.so.6", use_errno=True
    )
except OSError:  # pragma: no cover - non-glibc systems
    _libc = None


def make_preexec(
    rlimit_as_bytes: int | None, cgroup_procs: Sequence[str] = ()
) -> Callable[[], None]:
    """Build the function the child runs between fork and exec (``cgroup_procs``: the
    sandbox's groups, joined first, `cgroups.Group.procs`)."""
    parent = os.getpid()
    libc = _libc
    join = [os.fsencode(p) for p in cgroup_procs]

    def preexec() -> None:
        for path in join:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the server died before prctl took effect
                os._exit(137)
        if rlimit_as_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as_bytes, rlimit_as_bytes))

    return preexec


@functools.lru_cache(maxsize=1)
def _setpriv() -> str | None:
    """``setpriv`` if it supports ``--pdeathsig`` (util-linux >= 2.33)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out else None


def with_pdeathsig(
    args: Sequence[str],
    env: Mapping[str, str],
    rlimit_as_bytes: int | None = None,
    cgroup_procs: Sequence[str] = (),
) -> tuple[list[str], Callable[[], None] | None]:
    """``(argv, preexec_fn)`` that start ``args`` so it dies with this thread (see above)."""
    setpriv = None if rlimit_as_bytes or cgroup_procs else _setpriv()
    if setpriv is None:
        return list(args), make_preexec(rlimit_as_bytes, cgroup_procs)
    # setpriv execs the command by PATH lookup in *its* environment: resolve it here
    exe = args[0] if "/" in args[0] else shutil.which(args[0], path=env.get("PATH", ""))
    if exe is None:
        raise FileNotFoundError(2, "No such file or directory", args[0])
    return [setpriv, "--pdeathsig", "KILL", "--", exe, *args[1:]], None


def spawn(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    rlimit_as_bytes: int | None = None,
    stdin: bool = True,
    stdout: bool = True,
    stderr: bool = True,
    merge_stderr: bool = False,
    cgroup_procs: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session with pipes for the fds asked for.

    A plain `subprocess.Popen` (vfork + exec: about a millisecond), not asyncio's
    subprocess machinery: that one starts a waitpid thread per child, and on
    Python 3.11 its ``wait()`` also waits for every pipe to close. `Child` wires
    the pipes into the event loop and waits on a pidfd instead.
    """
    pipe, null = subprocess.PIPE, subprocess.DEVNULL
    err = subprocess.STDOUT if merge_stderr else (pipe if stderr else null)
    argv, preexec = with_pdeathsig(args, env, rlimit_as_bytes, cgroup_procs)
    return subprocess.Popen(
        argv,
        stdin=pipe if stdin else null,
        stdout=pipe if stdout else null,
        stderr=err,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=preexec,
        close_fds=True,
    )


def _peek_exit(pid: int) -> int | None:
    """The exit status of a finished, not yet reaped child, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _IntoBuffer(asyncio.Protocol):
    """Appends what a pipe delivers to an `OutputBuffer`; closes it at EOF."""

    def __init__(self, buf: OutputBuffer, closed: asyncio.Future[None]) -> None:
        self.buf = buf
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        self.buf.append(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.buf.close()
        if not self.closed.done():
            self.closed.set_result(None)


class PopenLike(Protocol):
    """What `Child` needs of a started process: a `subprocess.Popen`, or a process
    another one started for us (`forkserver.ForkedProcess`, which also has an
    ``exited`` future, since only its parent can wait for it)."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Child:
    """A started process, its output pipes feeding buffers, driven by the event loop."""

    def __init__(self, popen: PopenLike) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.pipes_closed: list[asyncio.Future[None]] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._stdin_fd: int | None = None
        if popen.stdin is not None:
            self._stdin_fd = popen.stdin.fileno()
            os.set_blocking(self._stdin_fd, False)

    async def attach(self, stdout: OutputBuffer, stderr: OutputBuffer) -> None:
        """Feed stdout/stderr into the buffers; a fd that is not a pipe closes its buffer."""
        loop = asyncio.get_running_loop()
        for pipe, buf in ((self.popen.stdout, stdout), (self.popen.stderr, stderr)):
            if pipe is None:
                buf.close()
                continue
            closed: asyncio.Future[None] = loop.create_future()
            protocol = _IntoBuffer(buf, closed)
            transport, _ = await loop.connect_read_pipe(lambda p=protocol: p, pipe)  # type: ignore[misc]
            self._transports.append(transport)
            self.pipes_closed.append(closed)

    async def wait_exited(self) -> None:
        """Wait until the process has exited, *without* reaping it.

        While it is an unreaped zombie its pid (and so its process group id)
        cannot be reused, so the caller can still kill what is left of the
        group safely, then `reap`. A pidfd wakes the loop at exit; kernels
        without pidfds get a gentle poll.
        """
        reported = getattr(self.popen, "exited", None)
        if reported is not None:  # forked by a zygote, which reports the exit (forkserver)
            await reported
            return
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            delay = 0.001
            while _peek_exit(self.pid) is None and self.popen.poll() is None:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.05)
            return
        try:
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, exited)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)

    def reap(self) -> int:
        """Collect the exit status (Popen style: -N for signal N); the process has exited."""
        self.returncode = self.popen.wait()
        return self.returncode

    async def write_stdin(self, data: bytes, eof: bool) -> None:
        """Write without blocking the loop; a process that is gone just loses the data."""
        fd = self._stdin_fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(fd, _resolve, ready)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(fd)
        except (BrokenPipeError, ConnectionResetError, OSError):
            eof = True
        if eof:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self._stdin_fd is not None and self.popen.stdin is not None:
            self._stdin_fd = None
            with contextlib.suppress(OSError):
                self.popen.stdin.close()

    def close(self) -> None:
        """Release the pipes (after exit and drain)."""
        self.close_stdin()
        for t in self._transports:
            t.close()


def _proc_pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in _proc_pids():
        info = _stat_fields(pid)
        if info is not None:
            out[pid] = info[0]
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


def boot_ticks_now() -> int:
    """Now, in the clock ticks since boot that /proc/<pid>/stat uses for start times."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _stat_fields(pid: int) -> tuple[int, int] | None:
    """``(ppid, starttime)`` of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def pids_with_markers(markers: set[str], *, started_since: int = 0) -> set[int]:
    """Live processes whose ``MARKER_ENV`` value is one of ``markers`` (one /proc scan).

    Reading another process's environ is not free (the kernel walks its memory,
    and a Python starting up there slows down), so only processes of our uid
    that started after ``started_since`` (boot ticks) and are not our direct
    children (sandboxes we supervise ourselves) are read.
    """
    prefix = f"{MARKER_ENV}=".encode()
    wanted = {m.encode() for m in markers}
    me, uid = os.getpid(), os.getuid()
    found: set[int] = set()
    for pid in _proc_pids():
        if pid == me:
            continue
        info = _stat_fields(pid)
        if info is None or info[0] == me or info[1] < started_since:
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for entry in env.split(b"\0"):
            if entry.startswith(prefix) and entry[len(prefix) :] in wanted:
                found.add(pid)
                break
    return found


class Sweeper:
    """Kills what finished sandboxes left behind, in one /proc scan per batch.

    A sandbox's group dies with its entrypoint, but a daemon that called
    ``setsid`` and closed its pipes would survive. Scanning /proc costs a few
    milliseconds of the GIL, so it runs shortly after exits, off the sandbox's
    critical path, and many exits (50 sandboxes at once) share one scan.
    """

    def __init__(self, delay_s: float = 0.5) -> None:
        self.delay_s = delay_s
        self.started_since = boot_ticks_now() - 1
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._drained = False

    def add(self, marker: str) -> None:
        if self._drained:  # shutdown: the server kills every process it marked, after this
            return
        self._pending.add(marker)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.delay_s)
            batch, self._pending = self._pending, set()
            try:
                await asyncio.to_thread(self.sweep, batch)
            except Exception as exc:  # a failed sweep must not kill the server's loop
                log.warning("sweeping finished sandboxes failed: %s", type(exc).__name__)

    def sweep(self, markers: set[str]) -> None:
        for pid in pids_with_markers(markers, started_since=self.started_since):
            _kill(pid, signal.SIGKILL)

    async def drain(self) -> None:
        """Run what is pending now (server shutdown); later exits are left to the server's
        own sweep of every process it marked, so no task outlives the loop."""
        self._drained = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        batch, self._pending = self._pending, set()
        if batch:
            await asyncio.to_thread(self.sweep, batch)


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
    "Child",
    "PopenLike",
    "Sweeper",
    "descendants",
    "kill_tree",
    "killpg",
    "make_preexec",
    "marked_pids",
    "pid_alive",
    "spawn",
]
