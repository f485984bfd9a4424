"""Start ``python -c`` sandboxes by forking a warm interpreter instead of exec'ing one.

Why: on a small machine a fresh interpreter that imports pickle, logging,
threading and cloudpickle costs 50-70 ms of CPU before it runs a line of the
sandbox's code; a per-step task's whole remote life is that start-up.  Modal
itself hides container start-up behind warm pools and memory snapshots; this
is the local server's equivalent, and it changes only how long a start takes.

When it applies (otherwise the sandbox is started with `processes.spawn`, as
before): the command is ``python -c CODE [ARGS]`` or ``python -S -c CODE
[ARGS]``, ``python`` resolves on the sandbox's ``PATH`` to this server's own
interpreter, and no memory limit is asked for.  One zygote is kept per flag set
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
import contextlib
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from . import processes, zygote

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
    f"import sys;exec(compile(sys.argv[1],{zygote.FILENAME!r},'exec'),"
    "{'__name__':'_prefect_modal_zygote'})"
)
_MAX_REQUEST = zygote.MAX_REQUEST


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


class ForkedProcess:
    """A `subprocess.Popen` look-alike for a process a zygote forked.

    Its parent is the zygote, so this server cannot wait for it: the zygote
    reports its exit status, which resolves `exited`.
    """

    def __init__(
        self,
        pid: int,
        stdin: IO[bytes],
        stdout: IO[bytes],
        stderr: IO[bytes],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
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

    def __init__(self, flags: tuple[str, ...], env: dict[str, str], log_path: Path) -> None:
        self.ready = False
        self.dead = False
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._procs: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            *flags,
            "-c",
            _LAUNCHER,
            Path(zygote.__file__).read_text(encoding="utf-8"),
            _preload_spec(),
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
        self, argv: Sequence[str], code_index: int, env: Mapping[str, str], cwd: str
    ) -> ForkedProcess | None:
        """Fork a process for ``argv``; None if the zygote cannot (the caller execs)."""
        request_id = next(self._ids)
        request = json.dumps(
            {
                "id": request_id,
                "argv": list(argv),
                "code_index": code_index,
                "env": dict(env),
                "cwd": cwd,
            }
        ).encode()
        if len(request) > _MAX_REQUEST:
            return None
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            socket.send_fds(self.sock, [request], [stdin_r, stdout_w, stderr_w])
        except OSError:
            self._pending.pop(request_id, None)
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            return None
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        reply = await future
        pid = reply.get("pid")
        if not isinstance(pid, int):
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            log.debug("fork server could not start a process: %s", reply.get("error"))
            return None
        proc = ForkedProcess(
            pid,
            open(stdin_w, "wb", buffering=0),
            open(stdout_r, "rb", buffering=0),
            open(stderr_r, "rb", buffering=0),
            self._loop,
        )
        if pid in self._early_exits:
            proc.set_exit(self._early_exits.pop(pid))
        else:
            self._procs[pid] = proc
        return proc

    async def close(self) -> None:
        self._closing = True
        self._lost()
        if self.popen.poll() is None:
            self.popen.kill()
        await asyncio.to_thread(self.popen.wait, 10)


class ForkServer:
    """The zygotes of one local server, started on first use."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._zygotes: dict[tuple[object, ...], _Zygote] = {}
        self._home = state_dir / "forkserver-home"  # empty: no user site-packages
        self._starts = 0  # zygotes started, live or not: a broken one is not retried forever

    @staticmethod
    def match(args: Sequence[str], env: Mapping[str, str]) -> tuple[tuple[str, ...], int] | None:
        """``(flags, index of CODE)`` if ``args`` is a ``python [-S] -c`` of our interpreter."""
        if len(args) < 3 or args[0] == "":
            return None
        exe = args[0] if "/" in args[0] else shutil.which(args[0], path=env.get("PATH", ""))
        if exe is None:
            return None
        ours = os.path.abspath(sys.executable)
        if os.path.dirname(os.path.abspath(exe)) != os.path.dirname(ours):
            return None  # another directory is another environment (a venv is its bin/)
        if os.path.realpath(exe) != os.path.realpath(ours):
            return None
        for prefix, flags in _FLAVOURS.items():
            n = len(prefix)
            if tuple(args[1 : 1 + n]) == prefix and len(args) > 1 + n:
                return flags, n + 1
        return None

    async def spawn(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        rlimit_as_bytes: int | None = None,
    ) -> ForkedProcess | None:
        """A forked process running ``args``, or None: then start it the ordinary way."""
        if rlimit_as_bytes:
            return None  # a fresh process's address space is what the limit was sized for
        found = self.match(args, env)
        if found is None:
            return None
        flags, code_index = found
        startup = _startup_env(env)
        key = (flags, startup)
        z = self._zygotes.get(key)
        if z is None or z.dead:
            live = sum(1 for other in self._zygotes.values() if not other.dead)
            if live >= MAX_ZYGOTES or self._starts >= MAX_STARTS:
                return None
            self._start(key, flags, dict(startup))
            return None  # this one starts the ordinary way; the zygote warms up meanwhile
        if not z.ready:
            return None
        return await z.spawn(args, code_index, env, cwd)

    def _start(
        self, key: tuple[object, ...], flags: tuple[str, ...], startup: dict[str, str]
    ) -> None:
        self._home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.pathsep.join(
                [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]
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
            self._zygotes[key] = _Zygote(flags, env, self._state_dir / "forkserver.log")
        except OSError as exc:
            log.warning("could not start the local server's fork server: %s", exc)

    async def close(self) -> None:
        """Stop every zygote (their children, if any are left, die with them)."""
        zygotes, self._zygotes = list(self._zygotes.values()), {}
        await asyncio.gather(*(z.close() for z in zygotes), return_exceptions=True)


__all__ = ["ENV_SWITCH", "PRELOAD_MODULES", "ForkServer", "ForkedProcess", "enabled_by_default"]
