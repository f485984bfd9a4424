"""One local sandbox: its process group, its output, its lifetime.

How a Modal sandbox maps onto this machine (the emulation's limits):

* **Processes.** The entrypoint runs as a new session (process group) with the
  server's Python first on ``PATH`` (so ``python`` has cloudpickle and the
  project's packages); the image is only recorded, never built or pulled.
  When the entrypoint exits, the rest of its group is killed, as Modal tears
  down the container. ``exec`` runs more processes in the same "container".
  A ``python [-S] -c`` entrypoint is forked from a warm interpreter
  (`forkserver`) rather than exec'd: same session, environment, cwd and
  pipes, a fraction of the start-up cost.
* **Environment.** A clean one, never the server's: ``PATH``, ``HOME``, ``LANG``,
  ``TMPDIR``, ``PYTHONUNBUFFERED=1``, ``MODAL_SANDBOX_ID``, ``MODAL_TASK_ID``,
  ``MODAL_LOCAL_ROOT``, then the image's ``ENV`` lines, the named secrets, and
  the inline secrets and ``env=`` in the order the client sent them.
* **Filesystem.** There is no chroot. Each sandbox has a root directory
  ``<state_dir>/sandboxes/<id>/fs``, exported as ``MODAL_LOCAL_ROOT``; a path
  ``/p`` inside the sandbox is ``$MODAL_LOCAL_ROOT/p`` here. ``workdir`` (default
  ``/``) is the process's cwd under that root, ``HOME`` is ``/root`` there and
  ``TMPDIR`` is ``/tmp`` there. Absolute paths in user code still reach the host
  file system: use relative paths or ``MODAL_LOCAL_ROOT``.
* **Volumes.** ``<root>/<mount path>`` is a symlink to
  ``<state_dir>/volumes/<name>``, shared by every sandbox that mounts it; writes
  are visible at once (no commit/reload step).
* **Resources.** cpu, memory, gpu, region and cloud are recorded. Memory is
  enforced only when a hard limit is asked for (``memory=(request, limit)``):
  ``RLIMIT_AS`` of ``max(2 * limit, limit + 1 GiB)``, because address space is
  not resident memory and a tight ``RLIMIT_AS`` breaks Python and threads. A
  GPU request runs on CPU, with a warning as the first line of stderr.
* **Lifetime.** ``timeout`` ends the sandbox with status timeout (exit 124);
  ``terminate`` with status terminated (exit 137); ``idle_timeout`` (no exec
  running, no stdin write for that long) ends it as a timeout too.
* **Output** is kept whole, in files under ``<state_dir>/sandboxes/<id>/output``
  (`streams.OutputBuffer`), so a late reader can replay it from offset 0;
  Modal keeps a recent window only. A finished sandbox, its output and its root
  go after the server's retention period (`retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modal_proto import api_pb2

from ..api import filesystem as fs_tools
from ..records import SandboxRecord
from . import processes
from .forkserver import ForkedProcess, ForkServer
from .streams import OutputBuffer

log = logging.getLogger("prefect_modal.local")

DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 86400
_PUMP_CHUNK = 1 << 18
_EOF_GRACE_S = 1.0


@dataclass
class SandboxSpec:
    """What a create request asked for, validated; ``env`` holds secret values."""

    version: int
    app_id: str
    app_name: str | None
    name: str | None
    args: list[str]
    env: dict[str, str] = field(repr=False)
    env_names: list[str]
    secret_names: list[str]
    workdir: str | None
    timeout_s: float
    idle_timeout_s: float | None
    cpu: float | None
    memory_mib: int | None
    memory_max_mib: int | None
    gpu: str | None
    region: str | None
    cloud: str | None
    image: str
    volumes: dict[str, tuple[str, Path]]
    tags: dict[str, str]


class SandboxPaths:
    """The sandbox's root directory and the container-path mapping under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fs = root / "fs"
        self.output = root / "output"  # stdout/stderr files, outside the sandbox's view

    def exec_output(self, exec_id: str, fd: str) -> Path:
        """The file of an exec's ``fd`` (the client picks exec ids: never a path of theirs)."""
        digest = hashlib.sha256(exec_id.encode()).hexdigest()[:20]
        return self.output / f"exec-{digest}.{fd}"

    def resolve(self, container_path: str) -> Path:
        """``/a/b`` inside the sandbox -> ``<root>/fs/a/b``; ``..`` cannot climb out."""
        norm = posixpath.normpath("/" + container_path).lstrip("/")
        return self.fs / norm if norm else self.fs


def _exit_code(raw: int | None) -> int:
    if raw is None:
        return -1
    return 128 - raw if raw < 0 else raw


class ExecProcess:
    """A command started by ``sandbox.exec`` (or an fs-tools call answered in-server)."""

    def __init__(self, exec_id: str, paths: SandboxPaths | None = None) -> None:
        self.exec_id = exec_id
        self.stdout = OutputBuffer(paths.exec_output(exec_id, "stdout") if paths else None)
        self.stderr = OutputBuffer(paths.exec_output(exec_id, "stderr") if paths else None)
        self.finished_at: float | None = None  # time.monotonic() at the end
        self.done = asyncio.Event()
        self.code: int | None = None
        self.signal: int | None = None
        self.child: processes.Child | None = None
        self.stdin_offset = 0
        self.stdin_closed = False
        self.fs_command: tuple[str, dict[str, object]] | None = None
        self.fs_stdin = bytearray()
        self._stdin_lock = asyncio.Lock()

    def finish(self, code: int | None = None, sig: int | None = None) -> None:
        if self.done.is_set():
            return
        self.code, self.signal = code, sig
        self.finished_at = time.monotonic()
        self.done.set()

    async def write_stdin(self, offset: int, data: bytes, eof: bool) -> None:
        """Write at byte ``offset`` (retries resend; the overlap is dropped)."""
        async with self._stdin_lock:
            if offset < self.stdin_offset:
                data = data[self.stdin_offset - offset :]
            if self.fs_command is not None:
                self.fs_stdin.extend(data)
                self.stdin_offset += len(data)
                if eof:
                    self.stdin_closed = True
                return
            if self.child is None or self.stdin_closed:
                return
            self.stdin_offset += len(data)
            self.stdin_closed = eof
            await self.child.write_stdin(data, eof)


async def _drain_pipes(child: processes.Child, marker: str | None) -> None:
    """After the process exited: collect the rest of its output, then release the pipes.

    If something that escaped the process group still holds a pipe, kill every
    process with the sandbox's marker; if even that does not close it, give up
    on the pipe (the output so far is kept).
    """
    pending = [f for f in child.pipes_closed if not f.done()]
    if pending:
        _done, still = await asyncio.wait(pending, timeout=_EOF_GRACE_S)
        if still and marker:
            await asyncio.to_thread(processes.kill_tree, None, marker)
            await asyncio.wait(still, timeout=_EOF_GRACE_S)
    child.close()


class LocalSandbox:
    """A sandbox as a local process group, driven from the server's event loop."""

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        sandbox_id: str,
        task_id: str,
        paths: SandboxPaths,
        marker: str,
        on_change: Callable[[], None],
        sweeper: processes.Sweeper | None = None,
        forkserver: ForkServer | None = None,
    ) -> None:
        self.spec = spec
        self.id = sandbox_id
        self.task_id = task_id
        self.paths = paths
        self.marker = marker
        self._on_change = on_change
        self._sweeper = sweeper
        self._forkserver = forkserver
        self.tags = dict(spec.tags)
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.status = "running"
        self.returncode: int | None = None
        self.pid: int | None = None
        self.stdout = OutputBuffer(paths.output / "stdout")
        self.stderr = OutputBuffer(paths.output / "stderr")
        self.done = asyncio.Event()
        self.execs: dict[str, ExecProcess] = {}
        self._child: processes.Child | None = None
        self._kill_reason: str | None = None
        self._kill_requested = asyncio.Event()
        self._last_activity = time.monotonic()
        self._running_execs = 0
        self._stdin_lock = asyncio.Lock()
        self._stdin_offset = 0
        self._stdin_index = 0
        self._stdin_closed = False
        self._supervisor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._env: dict[str, str] = {}

    # ----- public view -----------------------------------------------------

    def record(self) -> SandboxRecord:
        s = self.spec
        return SandboxRecord(
            id=self.id,
            name=s.name,
            app_id=s.app_id,
            app_name=s.app_name,
            tags=dict(self.tags),
            gpu=s.gpu,
            cpu=s.cpu,
            memory_mib=s.memory_mib,
            region=s.region,
            cloud=s.cloud,
            image=s.image,
            env_names=list(s.env_names),
            secret_names=list(s.secret_names),
            workdir=s.workdir,
            volumes={path: name for path, (name, _) in s.volumes.items()},
            pid=self.pid,
            returncode=self.returncode,
            status=self.status,
            created_at=self.created_at,
            finished_at=self.finished_at,
            version=s.version,
            task_id=self.task_id,
            root=str(self.paths.fs),
        )

    def listing_key(self) -> tuple[object, ...]:
        """The parts of `record` that change after creation (the listing caches the rest)."""
        return (self.pid, self.status, self.returncode, self.finished_at, tuple(self.tags.items()))

    def result(self) -> api_pb2.GenericResult | None:
        """The GenericResult the client turns into a return code, or None while running."""
        if not self.done.is_set():
            return None
        g = api_pb2.GenericResult
        if self.status == "timeout":
            return g(status=g.GENERIC_STATUS_TIMEOUT, exitcode=124, exception="Sandbox timed out")
        if self.status == "terminated":
            return g(
                status=g.GENERIC_STATUS_TERMINATED, exitcode=137, exception="Sandbox terminated"
            )
        code = self.returncode if self.returncode is not None else -1
        status = g.GENERIC_STATUS_SUCCESS if code == 0 else g.GENERIC_STATUS_FAILURE
        return g(status=status, exitcode=code)

    # ----- start -----------------------------------------------------------

    def _build_env(self) -> dict[str, str]:
        home = self.paths.resolve("/root")
        tmp = self.paths.resolve("/tmp")
        env = {
            "PATH": os.pathsep.join(
                [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]
            ),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": str(tmp),
            "PYTHONUNBUFFERED": "1",
            "MODAL_SANDBOX_ID": self.id,
            "MODAL_TASK_ID": self.task_id,
            "MODAL_LOCAL_ROOT": str(self.paths.fs),
        }
        if self.spec.region:
            env["MODAL_REGION"] = self.spec.region
        if self.spec.cloud:
            env["MODAL_CLOUD_PROVIDER"] = self.spec.cloud
        env.update(self.spec.env)
        env[processes.MARKER_ENV] = self.marker
        return env

    def _prepare_dirs(self) -> None:
        self.paths.fs.mkdir(parents=True)  # a fresh id: the directory cannot exist yet
        os.mkdir(self.paths.resolve("/root"))
        os.mkdir(self.paths.resolve("/tmp"))
        for mount_path, (_name, host_dir) in self.spec.volumes.items():
            host_dir.mkdir(parents=True, exist_ok=True)
            link = self.paths.resolve(mount_path)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                continue
            link.symlink_to(host_dir, target_is_directory=True)
        if self.spec.workdir and self.spec.workdir != "/":
            self.paths.resolve(self.spec.workdir).mkdir(parents=True, exist_ok=True)

    def _rlimit_as(self) -> int | None:
        limit = self.spec.memory_max_mib
        if not limit:
            return None
        return max(2 * limit, limit + 1024) * 1024 * 1024

    async def start(self) -> None:
        """Spawn the entrypoint and supervise it; never raises for a bad command."""
        self._env = self._build_env()
        if self.spec.gpu:
            self.stderr.append(
                f"[prefect-modal local] GPU {self.spec.gpu!r} requested: this local sandbox "
                "runs on CPU, there is no GPU emulation.\n".encode()
            )
        args = self.spec.args or [shutil.which("sleep") or "sleep", "infinity"]
        cwd = str(self.paths.resolve(self.spec.workdir or "/"))
        popen: subprocess.Popen[bytes] | ForkedProcess | None = None
        try:
            self._prepare_dirs()
            if self._forkserver is not None:
                popen = await self._forkserver.spawn(
                    args, env=self._env, cwd=cwd, rlimit_as_bytes=self._rlimit_as()
                )
            if popen is None:
                popen = processes.spawn(
                    args, env=self._env, cwd=cwd, rlimit_as_bytes=self._rlimit_as()
                )
        except OSError as exc:
            self.stderr.append(
                f"[prefect-modal local] cannot start {args[0]!r}: {exc.strerror}\n".encode()
            )
            self.stdout.close()
            self.stderr.close()
            self._finish("exited", 127 if isinstance(exc, FileNotFoundError) else 126)
            return
        self._child = processes.Child(popen)
        await self._child.attach(self.stdout, self.stderr)
        self.pid = popen.pid
        self._on_change()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    # ----- lifetime --------------------------------------------------------

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def _next_deadline(self) -> tuple[float, str]:
        now = time.monotonic()
        lifetime_left = self.spec.timeout_s - (time.time() - self.created_at)
        best = (now + lifetime_left, "timeout")
        idle = self.spec.idle_timeout_s
        if idle and self._running_execs == 0:
            idle_at = self._last_activity + idle
            if idle_at < best[0]:
                best = (idle_at, "idle")
        return best

    async def _supervise(self) -> None:
        child = self._child
        assert child is not None
        exited = asyncio.ensure_future(child.wait_exited())
        kill_wait = asyncio.ensure_future(self._kill_requested.wait())
        reason: str | None = None
        try:
            while not exited.done():
                deadline, _why = self._next_deadline()
                delay = deadline - time.monotonic()
                if delay <= 0:
                    reason = "timeout"
                    break
                # with an idle timeout, look again every second (activity moves the deadline)
                cap = 1.0 if self.spec.idle_timeout_s else 3600.0
                await asyncio.wait(
                    {exited, kill_wait}, timeout=min(delay, cap), return_when="FIRST_COMPLETED"
                )
                if exited.done():
                    break
                if kill_wait.done():
                    reason = self._kill_reason or "terminated"
                    break
            if reason is None and self._kill_requested.is_set():
                reason = self._kill_reason or "terminated"  # killed before we looked
            if reason is not None:
                await asyncio.to_thread(processes.kill_tree, child.pid, self.marker)
            await exited
            # still a zombie, so the group id is still ours: the container goes away with
            # its entrypoint, then the entrypoint is reaped
            processes.killpg(child.pid)
            raw = child.reap()
            await _drain_pipes(child, self.marker)
        except asyncio.CancelledError:
            processes.kill_tree(child.pid, self.marker)
            raise
        finally:
            exited.cancel()
            kill_wait.cancel()
            self.stdout.close()
            self.stderr.close()
        if reason is None:
            self._finish("exited", _exit_code(raw))
        else:
            self._finish(reason, 124 if reason == "timeout" else 137)
        # stragglers that left the group and closed the pipes (daemons) go too, soon
        if self._sweeper is not None:
            self._sweeper.add(self.marker)

    def _spawn_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish(self, status: str, code: int) -> None:
        if self.done.is_set():
            return
        self.status = status
        self.returncode = code
        self.finished_at = time.time()
        for ex in self.execs.values():
            if not ex.done.is_set():
                ex.finish(sig=signal.SIGKILL)
            ex.stdout.close()
            ex.stderr.close()
        self.done.set()
        self._on_change()

    async def terminate(self, reason: str = "terminated") -> None:
        """Kill the whole tree and wait until the sandbox is finished."""
        if self.done.is_set():
            return
        if self._kill_reason is None:
            self._kill_reason = reason
        self._kill_requested.set()
        await self.done.wait()

    async def kill_now(self) -> None:
        """Server shutdown: kill synchronously, then let the supervisor record it."""
        self._kill_reason = self._kill_reason or "terminated"
        self._kill_requested.set()
        processes.kill_tree(self.pid, self.marker)
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._supervisor), 3)

    async def drain_background(self, timeout: float = 5.0) -> None:
        """Let straggler kills and exec supervisors finish (server shutdown)."""
        pending = list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def wait(self, timeout: float | None) -> bool:
        """Wait for the end; True if finished."""
        if self.done.is_set():
            return True
        if timeout is not None and timeout <= 0:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        return self.done.is_set()

    # ----- stdin -----------------------------------------------------------

    async def _write_stdin(self, data: bytes, eof: bool) -> None:
        if self._child is None or self._stdin_closed:
            return
        self._stdin_closed = eof
        await self._child.write_stdin(data, eof)

    async def stdin_write_at(self, offset: int, data: bytes, eof: bool) -> None:
        """V2: write at a byte offset; a retried write's overlap is dropped."""
        self.touch()
        async with self._stdin_lock:
            if offset < self._stdin_offset:
                data = data[self._stdin_offset - offset :]
            self._stdin_offset += len(data)
            await self._write_stdin(data, eof)

    async def stdin_write_indexed(self, index: int, data: bytes, eof: bool) -> None:
        """V1: writes are numbered from 1; a repeated index is a retry and is dropped."""
        self.touch()
        async with self._stdin_lock:
            if index and index <= self._stdin_index:
                return
            self._stdin_index = index
            await self._write_stdin(data, eof)

    # ----- exec ------------------------------------------------------------

    async def exec_start(
        self,
        exec_id: str,
        args: list[str],
        *,
        env: dict[str, str],
        workdir: str | None,
        timeout_s: float | None,
        stdout: bool,
        stderr: bool,
        merge_stderr: bool = False,
    ) -> ExecProcess:
        """Start a command in this sandbox (idempotent per ``exec_id``)."""
        if exec_id in self.execs:
            return self.execs[exec_id]
        ex = ExecProcess(exec_id, self.paths)
        self.execs[exec_id] = ex
        self.touch()
        if args and args[0] == fs_tools.FS_TOOLS_PATH:
            await self._start_fs_tool(ex, args)
            return ex
        full_env = dict(self._env)
        full_env.update(env)
        cwd = self.paths.resolve(workdir or self.spec.workdir or "/")
        try:
            cwd.mkdir(parents=True, exist_ok=True)
            popen = processes.spawn(
                args,
                env=full_env,
                cwd=str(cwd),
                rlimit_as_bytes=self._rlimit_as(),
                stdout=stdout,
                stderr=stderr,
                merge_stderr=merge_stderr,
            )
        except OSError as exc:
            ex.stderr.append(
                f"[prefect-modal local] cannot start {args[0]!r}: {exc.strerror}\n".encode()
            )
            ex.stdout.close()
            ex.stderr.close()
            ex.finish(code=127 if isinstance(exc, FileNotFoundError) else 126)
            return ex
        ex.child = processes.Child(popen)
        await ex.child.attach(ex.stdout, ex.stderr)
        self._running_execs += 1
        task = asyncio.ensure_future(self._supervise_exec(ex, timeout_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return ex

    async def _supervise_exec(self, ex: ExecProcess, timeout_s: float | None) -> None:
        child = ex.child
        assert child is not None
        exited = asyncio.ensure_future(child.wait_exited())
        try:
            try:
                await asyncio.wait_for(asyncio.shield(exited), timeout_s if timeout_s else None)
            except asyncio.TimeoutError:
                processes.killpg(child.pid)
                await exited
            raw = child.reap()
            if raw < 0:
                ex.finish(sig=-raw)
            else:
                ex.finish(code=raw)
            # output of an exec'd command may outlive it (a background child): keep
            # reading until the pipes close (the sandbox's end closes them at the latest)
            if child.pipes_closed:
                await asyncio.wait(child.pipes_closed)
            child.close()
        finally:
            exited.cancel()
            self._running_execs -= 1
            self.touch()

    async def _start_fs_tool(self, ex: ExecProcess, args: list[str]) -> None:
        try:
            ex.fs_command = fs_tools.parse_command(args[1] if len(args) > 1 else "")
        except (ValueError, TypeError):
            ex.stderr.append(
                b'{"error_kind": "InvalidArgument", "message": "bad fs-tools command"}'
            )
            ex.stdout.close()
            ex.stderr.close()
            ex.finish(code=2)
            return
        if ex.fs_command[0] != "WriteFile":  # everything but a write needs no stdin
            await self.run_fs_tool(ex)

    async def run_fs_tool(self, ex: ExecProcess) -> None:
        """Answer an fs-tools exec (after its stdin closed, for writes)."""
        if ex.done.is_set() or ex.fs_command is None:
            return
        name, params = ex.fs_command
        res = await asyncio.to_thread(
            fs_tools.run, name, params, self.paths.resolve, bytes(ex.fs_stdin)
        )
        ex.stdout.append(res.stdout)
        ex.stderr.append(res.stderr)
        ex.stdout.close()
        ex.stderr.close()
        ex.finish(code=res.returncode)
