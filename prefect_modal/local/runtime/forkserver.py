"""Start ``python -c`` sandboxes by forking a warm interpreter instead of exec'ing one.

Why: on a small machine a fresh interpreter that imports pickle, logging,
threading and cloudpickle costs 50-70 ms of CPU before it runs a line of the
sandbox's code; a per-step task's whole remote life is that start-up.  Modal
itself hides container start-up behind warm pools and memory snapshots; this
is the local server's equivalent, and it changes only how long a start takes.

When it applies (otherwise the sandbox is started with `processes.spawn`, as
before): the command is ``python -c CODE [ARGS]`` or ``python -S -c CODE
[ARGS]``, ``python`` resolves on the sandbox's ``PATH`` to this server's own
interpreter or to a built image's environment (`ForkServer.envs`: its venv runs
on this machine at the path the sandbox sees it at, so paths agree after the
fork), and no memory limit is asked for.  One zygote is kept per interpreter, flag set
and start-up environment (``PYTHON*``, ``LANG``, ``LC_ALL``, ``LC_CTYPE``: what an
interpreter reads when it starts), at most `MAX_ZYGOTES`; each is started on
first use, and commands go the old way until it is ready.

The forked process is a sandbox like any other: its own session and process
group, the sandbox's environment, cwd and pipes, nothing else open, the
server's marker variable, and death with the server (PDEATHSIG through the
zygote).  What differs from a fresh interpreter is documented in `zygote`:
`PRELOAD_MODULES` are already imported, and all children share one str hash
seed.  ``PREFECT_MODAL_LOCAL_FORK_SERVER=0`` (or ``LocalModal(fork_server=False)``,
``prefect-modal local serve --no-fork-server``) turns it off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import importlib.util
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from . import container, processes, seccomp_filter, zygote

log = logging.getLogger("prefect_modal.local")

ENV_SWITCH = "PREFECT_MODAL_LOCAL_FORK_SERVER"

#: Imported by each zygote before it forks: what `python -c` programs, and the
#: per-step bootstrap in particular, import first.  Missing ones are skipped.
PRELOAD_MODULES = (
    "site",
    "threading",
    "pickle",
    "logging",
    "traceback",
    "types",
    "binascii",
    "json",
    "asyncio",
    "cloudpickle",
)

MAX_ZYGOTES = 4
#: Zygote starts in a server's life (one that dies is replaced, but not forever).
MAX_STARTS = 8
_STARTUP_ENV = ("LANG", "LC_ALL", "LC_CTYPE")
_FLAVOURS = {("-c",): (), ("-S", "-c"): ("-S",)}
_LAUNCHER = (
    f"import sys;exec(compile(open(sys.argv[1]).read(),{zygote.FILENAME!r},'exec'),"
    "{'__name__':'_prefect_modal_zygote'})"
)
_MAX_REQUEST = zygote.MAX_REQUEST
_LAUNCHER_KEY = ("launcher",)
#: the launcher only forks and execs: isolated mode, no site, nothing preloaded
_LAUNCHER_FLAGS = ("-I", "-S")
_EMPTY_PRELOAD = json.dumps({"modules": [], "paths": []})


def enabled_by_default() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _startup_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted((k, v) for k, v in env.items() if k.startswith("PYTHON") or k in _STARTUP_ENV)
    )


def _preload_spec() -> str:
    """Module names, and the directories of those outside the standard library
    (a ``-S`` zygote has no site-packages on its path)."""
    paths_of = sysconfig.get_paths()
    stdlib = {os.path.realpath(paths_of[k]) for k in ("stdlib", "platstdlib") if k in paths_of}
    paths: list[str] = []
    for name in PRELOAD_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or spec.submodule_search_locations is None:
            continue  # built in, frozen, or a plain module of the standard library
        parent = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        if os.path.realpath(parent) not in stdlib and parent not in paths:
            paths.append(parent)
    return json.dumps({"modules": list(PRELOAD_MODULES), "paths": paths})


def _env_preload(interpreter: str) -> str:
    """`PRELOAD_MODULES` for a built image's environment: its own site-packages (a
    ``-S`` zygote has none on its path); modules it lacks are skipped by the zygote."""
    venv = Path(interpreter).parent.parent
    paths = sorted(str(p) for p in venv.glob("lib/python3*/site-packages"))
    return json.dumps({"modules": list(PRELOAD_MODULES), "paths": paths})


def _seccomp_text() -> str | None:
    """The sandboxes' seccomp filter as the requests carry it (base64); None where
    libseccomp is missing (announced by the server and in the sandbox's log,
    `seccomp_filter`)."""
    program = seccomp_filter.program()
    return None if program is None else _base64(program)


@functools.lru_cache(maxsize=2)
def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _payload_file(payload: bytes) -> int:
    """A file that holds ``payload``, open for reading by the zygote's child: a memfd
    (Linux), else an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("prefect-modal-request", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resolve_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_TIOCGPTPEER = 0x5441
_TIOCSPTLCK = 0x40045431


class Stdio:
    """A new process's stdin, stdout and stderr: the ends it gets and the ends we keep.

    Pipes by default (stdout or stderr can go to /dev/null, or stderr to
    stdout, as ``exec`` asks), or one pseudo-terminal for all three (``pty``).
    """

    def __init__(
        self,
        child: list[int],
        stdin: IO[bytes] | None,
        stdout: IO[bytes] | None,
        stderr: IO[bytes] | None,
    ) -> None:
        self.child = child
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    @classmethod
    def pipes(cls, stdout: bool = True, stderr: bool = True, merge_stderr: bool = False) -> Stdio:
        stdin_r, stdin_w = os.pipe()
        out_r = err_r = None
        if stdout:
            out_r, out_w = os.pipe()
        else:
            out_w = os.open(os.devnull, os.O_WRONLY)
        if merge_stderr:
            err_w = os.dup(out_w)
        elif stderr:
            err_r, err_w = os.pipe()
        else:
            err_w = os.open(os.devnull, os.O_WRONLY)
        return cls(
            [stdin_r, out_w, err_w],
            open(stdin_w, "wb", buffering=0),
            open(out_r, "rb", buffering=0) if out_r is not None else None,
            open(err_r, "rb", buffering=0) if err_r is not None else None,
        )

    @classmethod
    def pty(cls, rows: int = 0, cols: int = 0, devpts: str | None = None) -> Stdio:
        """A real terminal: the program's 0-2 are its slave side; output comes on stdout.

        ``devpts`` (a running container's ``/dev/pts``, seen through
        ``/proc/<init>/root``) makes the terminal on that container's own devpts
        instance, so that inside it the terminal has a name (``tty`` prints
        ``/dev/pts/N``, as on Modal); a terminal of this machine's devpts would be
        a tty without a name there.
        """
        if devpts is not None:
            master = os.open(devpts + "/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                import fcntl
                import struct

                fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))  # unlockpt()
                # TIOCGPTPEER (Linux 4.13): the slave of this master, without a path lookup
                slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
            except BaseException:
                os.close(master)
                raise
        else:
            master, slave = os.openpty()
        if rows and cols:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return cls(
            [slave, os.dup(slave), os.dup(slave)],
            open(os.dup(master), "wb", buffering=0),
            open(master, "rb", buffering=0),
            None,
        )

    def close_child_ends(self) -> None:
        for fd in self.child:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child = []

    def close(self) -> None:
        self.close_child_ends()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()


class ForkedProcess:
    """A `subprocess.Popen` look-alike for a process a zygote forked.

    Its parent is the zygote, so this server cannot wait for it: the zygote
    reports its exit status, which resolves `exited`.  For a new container,
    `info` is the read end of the pipe on which it reports its init's pid.
    """

    def __init__(
        self, pid: int, stdio: Stdio, loop: asyncio.AbstractEventLoop, info: int | None = None
    ) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdio.stdin
        self.stdout: IO[bytes] | None = stdio.stdout
        self.stderr: IO[bytes] | None = stdio.stderr
        self.info = info
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = loop.create_future()

    def set_exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        if not self.exited.done():
            self.exited.set_result(code)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; only after `exited` has resolved (`Child.reap` is called then)."""
        if self.returncode is None:
            raise RuntimeError(f"process {self.pid} has not exited yet: await `exited` first")
        return self.returncode


class _Zygote:
    """One warm interpreter and the socket to it, driven by the server's event loop."""

    def __init__(
        self,
        flags: tuple[str, ...],
        env: dict[str, str],
        log_path: Path,
        preload: str,
        executable: str = sys.executable,
    ) -> None:
        self.ready = False
        self.isolation: bool | None = None
        self.userns = False  # whether it can make user namespaces (`container.userns_test`)
        self.ready_event = asyncio.Event()
        self.dead = False
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.loop = self._loop
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._procs: dict[int, ForkedProcess] = {}
        self._send_lock = asyncio.Lock()
        self._early_exits: dict[int, int] = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            executable,
            *flags,
            "-c",
            _LAUNCHER,
            str(Path(zygote.__file__).resolve()),
            preload,
            str(Path(container.__file__).resolve()),
        ]
        argv, preexec = processes.with_pdeathsig(argv, env)
        with open(log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                argv,
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=env,
                cwd=str(log_path.parent),
                start_new_session=True,
                preexec_fn=preexec,
                close_fds=True,
            )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._loop.add_reader(ours.fileno(), self._on_readable)

    # -- messages from the zygote ------------------------------------------------------

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            message = json.loads(data)
            if "ready" in message:
                self.ready = True
                self.isolation = bool(message.get("isolation"))
                self.userns = bool(message.get("userns"))
                self.ready_event.set()
            elif "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif "exit" in message:
                proc = self._procs.pop(message["exit"], None)
                if proc is None:  # its pid reply is still on its way to `spawn`
                    self._early_exits[message["exit"]] = message["code"]
                else:
                    proc.set_exit(message["code"])

    def _lost(self) -> None:
        """The zygote is gone: its children died with it (PDEATHSIG)."""
        if self.dead:
            return
        self.dead, self.ready = True, False
        self.ready_event.set()  # nobody waits for a zygote that is gone
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_result({"error": "the fork server exited"})
        self._pending.clear()
        for proc in self._procs.values():
            proc.set_exit(-9)
        self._procs.clear()
        if not self._closing:
            log.warning(
                "the local server's fork server stopped answering; starting processes "
                "the ordinary way"
            )

    # -- starting a process ------------------------------------------------------------

    async def spawn(
        self, fields: dict[str, Any], fds: list[int], private: dict[str, Any]
    ) -> int | str:
        """Ask for a fork with ``fields`` (cwd, container spec, ...), the child's ``fds``
        (0, 1, 2 and, for a container, its info and go pipes) and ``private`` (argv and
        env): the pid, or why not.

        ``private`` goes in a memfd passed with the fds, read by the forked child
        only: the zygote never has a sandbox's command, code or secrets in its
        memory, which every process it forks later starts as a copy of.
        """
        request_id = next(self._ids)
        request = json.dumps({"id": request_id, **fields}).encode()
        payload = json.dumps(private).encode()
        if len(request) + len(payload) > _MAX_REQUEST:
            return f"the command and environment are over {_MAX_REQUEST} bytes"
        try:
            memfd = _payload_file(payload)
        except OSError as exc:
            return f"cannot hand the command to the fork server ({exc.strerror})"
        try:
            return await self._send_request(request_id, request, [*fds, memfd])
        finally:
            os.close(memfd)

    async def _send_request(self, request_id: int, request: bytes, fds: list[int]) -> int | str:
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[request_id] = future
        async with self._send_lock:  # one sender waits for room at a time
            while True:
                try:
                    socket.send_fds(self.sock, [request], fds)
                    break
                except BlockingIOError:  # many starts at once fill the socket: wait for room
                    room: asyncio.Future[None] = self._loop.create_future()
                    self._loop.add_writer(self.sock.fileno(), _resolve_none, room)
                    try:
                        await room
                    finally:
                        self._loop.remove_writer(self.sock.fileno())
                except OSError as exc:
                    self._pending.pop(request_id, None)
                    return f"the fork server is gone ({exc.strerror})"
        reply = await future
        pid = reply.get("pid")
        if not isinstance(pid, int):
            why = str(reply.get("error") or "no reason given")
            log.warning("the fork server could not start a process: %s", why)
            return why
        return pid

    def track(self, proc: ForkedProcess) -> None:
        """Resolve ``proc.exited`` when the zygote reports it (maybe it already has)."""
        if proc.pid in self._early_exits:
            proc.set_exit(self._early_exits.pop(proc.pid))
        else:
            self._procs[proc.pid] = proc

    async def close(self) -> None:
        self._closing = True
        self._lost()
        if self.popen.poll() is None:
            self.popen.kill()
        await asyncio.to_thread(self.popen.wait, 10)


class ForkServer:
    """The zygotes of one local server.

    The *launcher*, a bare ``python -I -S`` zygote started with the server,
    starts every isolated sandbox and every ``exec`` in one: it forks, the
    child makes (or joins) the container (`container`) and execs the program.
    *Warm* zygotes (preloaded; one per flag set and start-up environment,
    started on first use) fork ``python [-S] -c`` sandboxes without an exec.
    """

    def __init__(self, state_dir: Path, warm: bool = True) -> None:
        self._state_dir = state_dir
        self.warm = warm
        self._zygotes: dict[tuple[object, ...], _Zygote] = {}
        self._home = state_dir / "forkserver-home"  # empty: no user site-packages
        self._starts = 0  # zygotes started, live or not: a broken one is not retried forever
        #: bin directories of built images' environments: their ``python`` gets warm
        #: zygotes too (one per environment), run at the path the sandbox sees it at
        self.envs: set[str] = set()

    def match(
        self, args: Sequence[str], env: Mapping[str, str]
    ) -> tuple[tuple[str, ...], int, str] | None:
        """``(flags, index of CODE, interpreter)`` if ``args`` is a ``python [-S] -c``
        of our interpreter or of a built image's environment (`envs`)."""
        if len(args) < 3 or args[0] == "":
            return None
        exe = args[0] if "/" in args[0] else shutil.which(args[0], path=env.get("PATH", ""))
        if exe is None:
            return None
        exe = os.path.abspath(exe)
        ours = os.path.abspath(sys.executable)
        if os.path.dirname(exe) in self.envs:
            interpreter = exe  # a venv's python: its path, not the base it links to
        elif os.path.dirname(exe) != os.path.dirname(ours):
            return None  # another directory is another environment (a venv is its bin/)
        elif os.path.realpath(exe) != os.path.realpath(ours):
            return None
        else:
            interpreter = sys.executable
        for prefix, flags in _FLAVOURS.items():
            n = len(prefix)
            if tuple(args[1 : 1 + n]) == prefix and len(args) > 1 + n:
                return flags, n + 1, interpreter
        return None

    async def start_launcher(self, timeout: float = 30.0) -> bool:
        """Start the launcher; True if it can make containers (namespaces and mounts)."""
        z = self._zygotes.get(_LAUNCHER_KEY)
        if z is None or z.dead:
            z = self._start(_LAUNCHER_KEY, _LAUNCHER_FLAGS, {}, _EMPTY_PRELOAD)
            if z is None:
                return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(z.ready_event.wait(), timeout)
        return bool(z.ready and z.isolation)

    @property
    def launcher_userns(self) -> bool:
        """Whether the launcher can put sandboxes in user namespaces of their own."""
        z = self._zygotes.get(_LAUNCHER_KEY)
        return bool(z is not None and z.ready and z.userns)

    def _warm(
        self, flags: tuple[str, ...], env: Mapping[str, str], interpreter: str
    ) -> _Zygote | None:
        """The ready warm zygote for this interpreter, flags and start-up env, if
        there is one (if not, one is started for the next sandbox)."""
        startup = _startup_env(env)
        key = (interpreter, flags, startup)
        z = self._zygotes.get(key)
        if z is None or z.dead:
            live = sum(1 for other in self._zygotes.values() if not other.dead)
            if live < MAX_ZYGOTES + 1 and self._starts < MAX_STARTS:
                preload = (
                    _preload_spec() if interpreter == sys.executable else _env_preload(interpreter)
                )
                self._start(key, flags, dict(startup), preload, interpreter)
            return None
        return z if z.ready else None

    async def spawn(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        stdio: Stdio,
        rlimit_as_bytes: int | None = None,
        isolate: dict[str, Any] | None = None,
        join: int | None = None,
        go: int | None = None,
        netns: int | None = None,
        pty: bool = False,
        cgroup_procs: Sequence[str] = (),
    ) -> ForkedProcess | None:
        """Start ``args`` through a zygote.

        ``isolate`` (a container spec, `isolation.Layout.spec`) starts a new
        container; ``join`` (an init's pid) runs it in a running one; ``go`` is
        the read end of the pipe the new container waits on before its program
        starts; ``netns`` a network namespace it joins (the fd after ``go``'s;
        both are closed here). Returns None when it should be started the ordinary
        way (no container asked for, no warm zygote ready); raises OSError when a
        container was asked for and cannot be started. Takes over ``stdio``'s
        child ends (closed here). ``cgroup_procs`` (`cgroups.Group.procs`): the
        child joins these groups before anything else (`container.join_cgroups`).
        """
        fields: dict[str, Any] = {
            "cwd": cwd,
            "isolate": isolate,
            "join": join,
            "rlimit_as": rlimit_as_bytes,
            "pty": pty,
            "cgroup": list(cgroup_procs),
        }
        if isolate is not None or join is not None:
            fields["seccomp"] = _seccomp_text()
        private = {"argv": list(args), "env": dict(env)}
        zygote = None
        found = self.match(args, env) if self.warm and join is None else None
        if found is not None and not rlimit_as_bytes:
            # the warm interpreter's address space is not what a memory limit was sized for
            zygote = self._warm(found[0], env, found[2])
            fields["code_index"] = found[1]
        if zygote is None:
            if isolate is None and join is None:
                return None
            fields["code_index"] = None
            zygote = self._zygotes.get(_LAUNCHER_KEY)
            if zygote is None or zygote.dead or not await self.start_launcher():
                stdio.close_child_ends()
                for fd in (go, netns):  # ours to close, as when they are sent
                    if fd is not None:
                        os.close(fd)
                raise OSError(11, "the local server's launcher is not running (see forkserver.log)")
        fds = list(stdio.child)
        info_r = info_w = None
        if isolate is not None:
            info_r, info_w = os.pipe()
            fds.append(info_w)
            if go is not None:
                fds.append(go)
            if netns is not None:  # a namespace made ahead (`netns_pool`): after go
                fds.append(netns)
        try:
            pid = await zygote.spawn(fields, fds, private)
        finally:
            stdio.close_child_ends()
            for fd in (info_w, go, netns):
                if fd is not None:
                    os.close(fd)
        if isinstance(pid, str):
            if info_r is not None:
                os.close(info_r)
            if isolate is None and join is None:
                return None
            stdio.close()
            raise OSError(11, f"the local server's fork server could not start it: {pid}")
        proc = ForkedProcess(pid, stdio, zygote.loop, info_r)
        zygote.track(proc)
        return proc

    def _start(
        self,
        key: tuple[object, ...],
        flags: tuple[str, ...],
        startup: dict[str, str],
        preload: str,
        interpreter: str = sys.executable,
    ) -> _Zygote | None:
        self._home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.pathsep.join(
                [os.path.dirname(interpreter), "/usr/local/bin", "/usr/bin", "/bin"]
            ),
            "HOME": str(self._home),
            **startup,
        }
        self._starts += 1
        if self._starts == MAX_STARTS:
            log.warning(
                "the local server's fork server was started %d times; if this one stops too, "
                "sandboxes start as fresh processes from then on (see %s)",
                MAX_STARTS,
                self._state_dir / "forkserver.log",
            )
        try:
            z = _Zygote(flags, env, self._state_dir / "forkserver.log", preload, interpreter)
        except OSError as exc:
            log.warning("could not start the local server's fork server: %s", exc)
            return None
        self._zygotes[key] = z
        return z

    async def close(self) -> None:
        """Stop every zygote (their children, if any are left, die with them)."""
        zygotes, self._zygotes = list(self._zygotes.values()), {}
        await asyncio.gather(*(z.close() for z in zygotes), return_exceptions=True)


__all__ = [
    "ENV_SWITCH",
    "PRELOAD_MODULES",
    "ForkServer",
    "ForkedProcess",
    "Stdio",
    "enabled_by_default",
]
