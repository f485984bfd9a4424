"""One local sandbox: its container, its processes, its output, its lifetime.

How a Modal sandbox maps onto this machine (the emulation's limits):

* **Isolation** (`isolation`, `container`). Each sandbox is a container made
  with Linux namespaces: its own root (a writable directory of its own under
  the state directory, the image's directories read-only, volumes bound at
  their mount paths), its own process view (PID namespace, its own
  ``/proc``), IPC and hostname, no more privileges than a container gets. So
  ``/workspace/x`` means the same to the entrypoint, to ``exec`` and to the file
  API, and nothing outside the root, its volumes and the host directories the
  operator chose to show is reachable. Until images are built from their
  definition, the image is this machine's userland plus this server's Python
  environment (so ``python`` has cloudpickle and the project's packages).
  Without namespaces (not root, not Linux, or turned off) a sandbox is a
  process group on the host, and says so in its first log line.
* **Network** (`network`). Every isolated sandbox has a namespace of its own,
  so two can serve the same port and none reaches this machine's loopback,
  with outbound access through ``pasta`` where installed; ``block_network``:
  loopback only. The host ports it is meant to reach (the Prefect API of a
  flow run's sandbox) are forwarded into it by the server.
* **Processes.** The entrypoint runs in its own session; when it exits, the
  container goes (everything else in it is killed). ``exec`` joins the
  container. Every process is forked by the fork server (`forkserver`),
  ``python [-S] -c`` ones from a warm interpreter without an exec at all.
* **Environment.** A clean one, never the server's: ``PATH``, ``HOME=/root``,
  ``LANG``, ``TMPDIR=/tmp``, ``PYTHONUNBUFFERED=1``, ``MODAL_SANDBOX_ID``,
  ``MODAL_TASK_ID``, then the image's ``ENV`` lines, the named secrets, and
  the inline secrets and ``env=`` in the order the client sent them.
* **Resources.** cpu, memory, gpu, region and cloud are recorded. cpu, memory
  and a pids limit are held by the sandbox's cgroup where this machine allows
  (`cgroups`: its processes join it before they start anything); over its
  memory it ends with exit 137 and the reason in its result and record. Where
  cgroups cannot hold memory, a hard limit (``memory=(request, limit)``) falls
  back to ``RLIMIT_AS`` of ``max(2 * limit, limit + 1 GiB)`` (address space is
  not resident memory, and a tight ``RLIMIT_AS`` breaks Python and threads), and
  its log says what is not enforced. A GPU request runs on CPU, with a warning
  as the first line of stderr.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modal_proto import api_pb2

from ..records import SandboxRecord
from . import container, isolation, layers, processes, safe_files, seccomp_filter, userns
from .cgroups import Cgroups, Group, SandboxLimits
from .forkserver import ForkedProcess, ForkServer, Stdio
from .isolation import FsRoot, ImageView
from .netns_pool import NetnsPool
from .network import NO_PASTA_NOTICE, Forward, Forwards
from .streams import OutputBuffer
from .userns import IdMap
from .volume_views import VolumeView, merge_view

log = logging.getLogger("prefect_modal.local")

DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 86400
_PUMP_CHUNK = 1 << 18
_EOF_GRACE_S = 1.0
_PASTA_READY_S = 5.0


@dataclass
class SandboxRequest:
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
    network: str = "host"  # "host" (not isolated), "none" (block_network) or "own"
    #: host loopback ports reachable on the sandbox's own loopback (`network.plan`)
    forwards: list[Forward] = field(default_factory=list)
    pty: bool = False
    pty_size: tuple[int, int] = (0, 0)  # rows, columns (0: the terminal's default)
    #: file trees copied, in order, into the new root (see `layers`)
    layers: list[Path] = field(default_factory=list)
    image_id: str = ""  # the image it was created from (a snapshot inherits its ENV)
    #: read-only binds of local files (container path -> host path), isolated sandboxes
    binds: dict[str, Path] = field(default_factory=dict)
    #: the image's own view (a built image: its Python, not the server's), else the server's
    view: ImageView | None = None
    #: PATH of the image (its environment's bin first), else the server's
    path: list[str] = field(default_factory=list)
    #: a line for the sandbox's log before its program's output (e.g. a registry image)
    notice: str = ""
    #: v1 volumes (mount path -> its private view, merged into the volume at the end:
    #: `volume_views`); a mount path not here is bound live (v2)
    volume_views: dict[str, VolumeView] = field(default_factory=dict)
    #: a build sandbox's writable view directories: container path -> the upper
    #: directory of its writable overlay (`isolation.layout`), isolated only
    uppers: dict[str, Path] = field(default_factory=dict)
    #: ``cpu=(request, limit)``'s limit, in cores (`cgroups.SandboxLimits.of`)
    cpu_max: float | None = None

    def volume_dirs(self) -> dict[str, Path]:
        """Mount path -> the host directory bound there: a v1 volume's view, else the volume."""
        return {
            mp: (self.volume_views[mp].view if mp in self.volume_views else host)
            for mp, (_name, host) in self.volumes.items()
        }


@dataclass
class Isolation:
    """How this server isolates its sandboxes (a sandbox without one is not isolated)."""

    view: ImageView
    pasta: str | None = None
    #: network namespaces made ahead with pasta attached (root only), else None
    netns: NetnsPool | None = None
    #: the user namespace each sandbox gets (`userns`); None: none (root inside is
    #: root outside, said at start and in each sandbox's log)
    idmap: IdMap | None = None


class SandboxFinishedError(Exception):
    """The sandbox has finished: nothing more can run or be read in it."""


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


async def _info_lines(reader: asyncio.StreamReader) -> AsyncIterator[tuple[str, int | None]]:
    """A container's info pipe as `container.start` writes it: ``("init", pid)`` once
    and ``("ready", None)`` once (the monitor's and the init's lines, which may
    cross), then nothing. A second ``init``, an ``exit`` or any other text is
    ignored: once the sandbox's code runs, nothing on this pipe is believed (an
    ``init <host pid>`` from it would point the file API and ``exec`` at the host).
    """
    seen: set[str] = set()
    async for raw in reader:
        line = raw.decode(errors="replace").strip()
        kind, _, rest = line.partition(" ")
        if kind in seen:
            continue
        if kind == "init" and rest.isdigit():
            seen.add(kind)
            yield kind, int(rest)
        elif line == "ready":
            seen.add(kind)
            yield kind, None
        if len(seen) == 2:
            return


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
        #: killed by its ``timeout``: the router then reports no exit status, so the
        #: client's own exec deadline gives its -1 (`api.router.CommandRouter.TaskExecWait`)
        self.timed_out = False
        self.child: processes.Child | None = None
        self.stdin_offset = 0
        self.stdin_closed = False
        self.fs_command: tuple[str, dict[str, object]] | None = None
        #: a file-API write's stdin: on disk beyond 1 MiB (the server's memory stays flat)
        self.fs_stdin = safe_files.Spool(paths.output if paths else None)
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


def _make_workdir(host_path: str, workdir: str) -> str | None:
    """Create a missing workdir (``mkdir -p``) as Modal's runtime does; Modal's message
    if it cannot be a directory (a file on the way), else None. For sandboxes that are
    not isolated; an isolated one's container does the same (`container._enter_workdir`)."""
    try:
        os.makedirs(host_path, exist_ok=True)
    except OSError as exc:
        return container.workdir_failure(workdir, exc)
    return None


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
        spec: SandboxRequest,
        *,
        sandbox_id: str,
        task_id: str,
        paths: SandboxPaths,
        marker: str,
        on_change: Callable[[], None],
        sweeper: processes.Sweeper | None = None,
        forkserver: ForkServer | None = None,
        isolation: Isolation | None = None,
        not_isolated_because: str | None = None,
        output_window: int | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.spec = spec
        #: the server's cgroups (`cgroups`) and this sandbox's group, while it has one
        self._cgroups = cgroups
        self._group: Group | None = None
        #: why it ended, when its exit code does not say it all (out of memory)
        self.exit_reason: str | None = None
        self.memory_peak_mib: float | None = None
        self.id = sandbox_id
        self.task_id = task_id
        self.paths = paths
        self.marker = marker
        self._on_change = on_change
        self._sweeper = sweeper
        self._forkserver = forkserver
        self.isolation = isolation
        self._not_isolated_because = not_isolated_because
        #: the host pid the server reaches the container through: its monitor, which has all
        #: its namespaces but the PID one (whose pid_for_children it has): `container.start`
        self.init_pid: int | None = None
        self._container_up = asyncio.Event()  # init known and root built, or never will be
        self._pasta: subprocess.Popen[bytes] | None = None
        self._forwards = Forwards()
        #: read-only view directories its image's layers add files to (`layers.overlays`)
        self._overlays: dict[str, list[str]] = {}
        self.tags = dict(spec.tags)
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.status = "running"
        self.returncode: int | None = None
        self.pid: int | None = None
        self.stdout = OutputBuffer(paths.output / "stdout", window=output_window)
        self.stderr = OutputBuffer(paths.output / "stderr", window=output_window)
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
        #: stdin written before the entrypoint exists (a delayed start), kept for it
        self._early_stdin: list[tuple[bytes, bool]] = []
        self._stdin_ready = False
        self._supervisor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._env: dict[str, str] = {}

    @property
    def view(self) -> ImageView:
        """What this sandbox sees of the host read-only (isolated sandboxes only)."""
        assert self.isolation is not None
        return self.spec.view or self.isolation.view

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
            init_pid=self.init_pid,
            isolated=self.isolation is not None,
            limits=self._group.limits.describe() if self._group is not None else {},
            exit_reason=self.exit_reason,
            memory_peak_mib=self.memory_peak_mib,
        )

    def listing_key(self) -> tuple[object, ...]:
        """The parts of `record` that change after creation (the listing caches the rest)."""
        return (
            self.pid,
            self.init_pid,
            self.status,
            self.returncode,
            self.finished_at,
            tuple(self.tags.items()),
        )

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
        if self.exit_reason:
            return g(status=status, exitcode=code, exception=self.exit_reason)
        return g(status=status, exitcode=code)

    # ----- start -----------------------------------------------------------

    def _build_env(self) -> dict[str, str]:
        path = list(self.spec.path)
        if not path:
            path = [os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin"]
            path += ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        if self.isolation is not None:
            home, tmp = "/root", "/tmp"
        else:  # a host path: the process sees the host's file system
            home, tmp = str(self.paths.resolve("/root")), str(self.paths.resolve("/tmp"))
        env = {
            "PATH": os.pathsep.join(dict.fromkeys(path)),
            "HOME": home,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": tmp,
            "PYTHONUNBUFFERED": "1",
            "MODAL_SANDBOX_ID": self.id,
            "MODAL_TASK_ID": self.task_id,
        }
        if self.isolation is None:
            env["MODAL_LOCAL_ROOT"] = str(self.paths.fs)
        if self.spec.region:
            env["MODAL_REGION"] = self.spec.region
        if self.spec.cloud:
            env["MODAL_CLOUD_PROVIDER"] = self.spec.cloud
        env.update(self.spec.env)
        env[processes.MARKER_ENV] = self.marker
        return env

    def _prepare_dirs(self) -> None:
        if self.isolation is not None:
            view = self.view
            isolation.prepare_root(self.paths.fs, view)
            readonly = [*view.dirs, *view.host_dirs]
            # under the read-only directories a layer's files are overlaid, not copied
            self._overlays = layers.overlays(self.spec.layers, readonly)
            for layer in self.spec.layers:
                layers.copy_tree(layer, self.paths.fs, layers.relative_skips(readonly))
            if self.spec.layers:  # a snapshot's symlinks must not lead a mount point astray
                targets = [*view.dirs, *view.host_dirs, *view.masked, *self.spec.volumes]
                targets += [*self.spec.binds, "/proc", "/dev"]
                layers.clear_way(self.paths.fs, targets)
            for host_dir in self.spec.volume_dirs().values():
                host_dir.mkdir(parents=True, exist_ok=True)
            for upper in self.spec.uppers.values():
                upper.mkdir(parents=True, exist_ok=True)
                isolation.overlay_workdir(upper).mkdir(parents=True, exist_ok=True)
            self._own_writable_dirs()
            return
        self.paths.fs.mkdir(parents=True)  # a fresh id: the directory cannot exist yet
        os.mkdir(self.paths.resolve("/root"))
        os.mkdir(self.paths.resolve("/tmp"))
        for layer in self.spec.layers:
            layers.copy_tree(layer, self.paths.fs)
        for mount_path, host_dir in self.spec.volume_dirs().items():
            host_dir.mkdir(parents=True, exist_ok=True)
            link = self.paths.resolve(mount_path)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                continue
            link.symlink_to(host_dir, target_is_directory=True)

    def own(self, path: Path) -> None:
        """Give what the server made at ``path`` for this sandbox to write to its root
        (`userns.own_tree`: as root; a normal user's files already are root's inside)."""
        if self.isolation is not None and self.isolation.idmap is not None:
            userns.own_tree(path, self.isolation.idmap)

    def _own_writable_dirs(self) -> None:
        self.own(self.paths.fs)
        for source in self.spec.binds.values():  # local files: root's, read-only (EROFS)
            self.own(source)
        for host_dir in self.spec.volume_dirs().values():
            self.own(host_dir)
        idmap = self.isolation.idmap if self.isolation is not None else None
        for path, upper in self.spec.uppers.items():
            if idmap is not None and os.geteuid() != 0:  # root: the host's dir is idmapped
                userns.mirror_dirs(path, upper, idmap)
            self.own(upper)
            self.own(isolation.overlay_workdir(upper))

    @property
    def overlays(self) -> dict[str, list[str]]:
        """The read-only view directories its image's layers add files to, each with
        the layers' directories there, top-most first (`layers.overlays`)."""
        return dict(self._overlays)

    def _rlimit_as(self) -> int | None:
        """The fallback where cgroups cannot hold memory: an address-space limit for an
        explicit hard limit only (a tight one breaks Python and threads, and a request
        alone is no limit on Modal). None when the sandbox's cgroup holds its memory."""
        limit = self.spec.memory_max_mib
        if not limit or self._memory_enforced():
            return None
        return max(2 * limit, limit + 1024) * 1024 * 1024

    def _memory_enforced(self) -> bool:
        return (
            self._group is not None
            and self._cgroups is not None
            and "memory" in self._cgroups.enforced
        )

    def _cgroup_procs(self) -> list[str]:
        """The ``cgroup.procs`` files each of its processes joins first (`cgroups`)."""
        group = self._group
        return group.procs if group is not None and not group.removed else []

    def _make_cgroup(self) -> None:
        """Its group, with its limits, before its first process (`cgroups.Cgroups.create`)."""
        if self._cgroups is None:
            return
        s = self.spec
        self._group = self._cgroups.create(
            self.id,
            SandboxLimits.of(
                cpu=s.cpu,
                cpu_max=s.cpu_max,
                memory_mib=s.memory_mib,
                memory_max_mib=s.memory_max_mib,
                pids=self._cgroups.pids_limit,
                strict_requests=self._cgroups.strict_requests,
            ),
        )
        efd = self._group.oom_eventfd() if self._group is not None else None
        if efd is not None:
            asyncio.get_running_loop().add_reader(efd, self._on_oom, efd)

    def _on_oom(self, efd: int) -> None:
        """cgroup v1: the sandbox met its memory limit and the kernel's OOM killer is
        killing one of its processes; the whole sandbox ends then, as a container does
        on Modal (its guide, "Resources": a hard memory limit "will OOM kill
        containers"), and as cgroup v2's ``memory.oom.group`` does by itself."""
        with contextlib.suppress(OSError):
            os.read(efd, 8)
        # the event comes as the group meets its limit, before the kernel's kill is counted
        if self._group is not None and not self._ending():
            self._kill_reason = "oom"
            self._kill_requested.set()

    async def _remove_cgroup(self) -> None:
        """The sandbox has ended: kill what is left in its group and remove it."""
        group = self._group
        if group is None or group.removed:
            return
        efd = group.eventfd
        if efd is not None:
            asyncio.get_running_loop().remove_reader(efd)
        await asyncio.to_thread(group.remove)
        if self._cgroups is not None:
            self._cgroups.forget(self.id)

    async def start(self, delay_s: float = 0.0) -> None:
        """Start the entrypoint and supervise it; never raises for a bad command.

        `delay_s` (the latency model's container start, `local/latency.py`): the
        sandbox exists at once, as on Modal once `create()` returns, and its
        entrypoint starts after the delay; stdin written meanwhile is kept for it,
        and a terminate (or the server's stop) ends it without a start.
        """
        if delay_s > 0:
            self._spawn_background(self._start_later(delay_s))
            return
        await self._start_now()

    async def _start_later(self, delay_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._kill_requested.wait(), delay_s)
        if not self._kill_requested.is_set():
            await self._start_now()
            return
        self.stdout.close()
        self.stderr.close()
        self._container_up.set()
        reason = self._kill_reason or "terminated"
        self._finish(reason, 124 if reason == "timeout" else 137)

    async def _start_now(self) -> None:
        self._env = self._build_env()
        if self.spec.notice:
            self.stderr.append(self.spec.notice.encode())
        if self.isolation is None and self._not_isolated_because:
            self.stderr.append(
                isolation.NOT_ISOLATED_NOTICE.format(why=self._not_isolated_because).encode()
            )
        elif self.isolation is not None and self.isolation.idmap is None:
            self.stderr.append(userns.NO_USERNS_NOTICE.encode())
        if self.isolation is not None:
            self._announce_no_seccomp()
        if self._cgroups is not None and self._cgroups.missing:
            self.stderr.append(self._cgroups.sandbox_notice().encode())
        if self.spec.gpu:
            self.stderr.append(
                f"[prefect-modal local] GPU {self.spec.gpu!r} requested: this local sandbox "
                "runs on CPU, there is no GPU emulation.\n".encode()
            )
        if self.spec.network == "own" and self.isolation and not self.isolation.pasta:
            self.stderr.append(NO_PASTA_NOTICE.encode())
        args = self.spec.args or [shutil.which("sleep") or "sleep", "infinity"]
        popen: subprocess.Popen[bytes] | ForkedProcess | None = None
        go_w: int | None = None
        try:
            if self.spec.layers:  # copying files: off the event loop
                await asyncio.to_thread(self._prepare_dirs)
            else:
                self._prepare_dirs()
            self._make_cgroup()
            if self.isolation is not None:
                popen, go_w = await self._start_container(args)
            else:
                cwd = str(self.paths.resolve(self.spec.workdir or "/"))
                problem = _make_workdir(cwd, self.spec.workdir or "/")
                if problem is not None:
                    self.stderr.append(f"[prefect-modal local] {problem}\n".encode())
                    self.stdout.close()
                    self.stderr.close()
                    self._container_up.set()
                    self._finish("exited", container.WORKDIR_FAILED)
                    await self._remove_cgroup()
                    return
                if self._forkserver is not None:
                    popen = await self._forkserver.spawn(
                        args,
                        env=self._env,
                        cwd=cwd,
                        stdio=Stdio.pipes(),
                        rlimit_as_bytes=self._rlimit_as(),
                        cgroup_procs=self._cgroup_procs(),
                    )
                if popen is None:
                    popen = processes.spawn(
                        args,
                        env=self._env,
                        cwd=cwd,
                        rlimit_as_bytes=self._rlimit_as(),
                        cgroup_procs=self._cgroup_procs(),
                    )
        except OSError as exc:
            self.stderr.append(
                f"[prefect-modal local] cannot start {args[0]!r}: {exc.strerror}\n".encode()
            )
            self.stdout.close()
            self.stderr.close()
            self._container_up.set()
            self._finish("exited", 127 if isinstance(exc, FileNotFoundError) else 126)
            await self._remove_cgroup()
            return
        self._child = processes.Child(popen)
        await self._child.attach(self.stdout, self.stderr)
        async with self._stdin_lock:  # what was written before it existed goes first
            early, self._early_stdin = self._early_stdin, []
            for data, eof in early:
                await self._child.write_stdin(data, eof)
            self._stdin_ready = True
        self.pid = popen.pid
        self._on_change()
        info = getattr(popen, "info", None)
        if info is not None:
            self._spawn_background(self._watch_container(info, go_w))
        else:
            self._container_up.set()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self._supervisor.add_done_callback(self._background_done)

    def _announce_no_seccomp(self) -> None:
        """In the sandbox's log, as at the server's start: no seccomp filter here, and why."""
        why = seccomp_filter.why_unavailable()
        if why is not None:
            self.stderr.append(seccomp_filter.NOTICE.format(why=why).encode())

    async def _start_container(self, args: list[str]) -> tuple[ForkedProcess, int | None]:
        assert self.isolation is not None and self._forkserver is not None
        spec = isolation.layout(
            self.paths.fs,
            self.view,
            self.spec.volume_dirs(),
            hostname=self.id.replace("_", "-")[:63],
            network=self.spec.network,
            binds=self.spec.binds,
            overlays=self._overlays,
            uppers=self.spec.uppers,
        )
        go_r = go_w = None
        made = None  # a namespace made ahead, its pasta ours from now on (`netns_pool`)
        if self.spec.network == "own" and self.isolation.netns is not None:
            made = self.isolation.netns.take()
            if made is not None:
                self._pasta = made.pasta
        # the program waits for what the server attaches first: pasta, forwards
        if self.spec.network == "own" and (
            (self.isolation.pasta and made is None) or self.spec.forwards
        ):
            go_r, go_w = os.pipe()
            spec["go_fd"] = 4
        if made is not None:
            spec["netns_fd"] = 4 if go_r is None else 5
        if self.isolation.idmap is not None:
            spec["userns"] = self.isolation.idmap.spec()
        stdio = Stdio.pty(*self.spec.pty_size) if self.spec.pty else Stdio.pipes()
        try:
            popen = await self._forkserver.spawn(
                args,
                env=self._env,
                cwd=self.spec.workdir or "/",
                stdio=stdio,
                rlimit_as_bytes=self._rlimit_as(),
                cgroup_procs=self._cgroup_procs(),
                isolate=spec,
                go=go_r,
                netns=made.fd if made is not None else None,
                pty=self.spec.pty,
            )
        except BaseException:
            if go_w is not None:
                os.close(go_w)
            stdio.close()
            self._stop_pasta()
            raise
        assert popen is not None
        return popen, go_w

    async def _watch_container(self, info_fd: int, go_w: int | None) -> None:
        """Learn the container's init pid; give it its network; note when its root is up.

        The info pipe is read as `container.start` writes it: one ``init <pid>``
        line (the monitor's, before anything of the sandbox runs), then one
        ``ready`` (the init's, before the program exists), in that order; both
        close their ends then. Anything else is not believed (`_info_lines`):
        the sandbox's end is the monitor's exit status, never a line.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), open(info_fd, "rb", buffering=0)
        )
        try:
            ready = False
            async for kind, value in _info_lines(reader):
                if kind == "init" and value is not None:
                    self.init_pid = value
                    self._on_change()
                    if go_w is not None:
                        await asyncio.gather(
                            self._attach_network(value),
                            self._open_forwards(value),
                        )
                        with contextlib.suppress(BrokenPipeError):  # it ended meanwhile
                            os.write(go_w, b"1")
                        os.close(go_w)
                        go_w = None
                else:
                    ready = True
                if ready and self.init_pid is not None:
                    self._container_up.set()
                    break  # nothing more is believed from this pipe
        finally:
            transport.close()
            if go_w is not None:
                os.close(go_w)
            self._container_up.set()

    async def _attach_network(self, init_pid: int) -> None:
        """Outbound access for a namespace of its own: pasta, our child (it dies with
        this server's thread, and `_stop_pasta` ends it with the sandbox); the
        program starts once pasta has configured the namespace.

        The sandbox can end at any await here (a terminate right after create):
        then its pasta, if started, is stopped, and nothing else is done. The
        sandbox's own end clears ``self._pasta`` (`_supervise`), so this method
        keeps its own reference and never reads the attribute back.
        """
        assert self.isolation is not None
        if not self.isolation.pasta or self._pasta is not None or self._ending():
            return  # no pasta here, or it came with a namespace made ahead
        user_fd = None
        try:
            ns_fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if self.isolation.idmap is not None and os.geteuid() != 0:
                user_fd = os.open(f"/proc/{init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return  # the container is already gone
        try:
            argv, preexec = processes.with_pdeathsig(
                isolation.pasta_command(ns_fd, user_fd), {"PATH": "/usr/bin:/bin"}
            )
            # a plain Popen (vfork + exec), not asyncio's: pasta is on the way to
            # every sandbox's start, and that machinery costs milliseconds
            with open(self.paths.root / "pasta.log", "ab") as log_file:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(ns_fd,) if user_fd is None else (ns_fd, user_fd),
                    preexec_fn=preexec,
                    start_new_session=True,
                )
        finally:
            os.close(ns_fd)
            if user_fd is not None:
                os.close(user_fd)
        self._pasta = proc
        if self._ending():  # it ended while pasta started: its end may have run already
            self._stop_pasta()
            return
        deadline = time.monotonic() + _PASTA_READY_S
        while not isolation.has_outbound_route(init_pid):  # a few ms: looked at each ms
            if self._pasta is not proc or self._ending():
                self._stop_pasta()
                return  # the sandbox ended meanwhile
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.paths.root / "pasta.log").read_bytes()[-300:]
                self.stderr.append(
                    b"[prefect-modal local] pasta could not give this sandbox outbound "
                    b"network access: " + log_text.strip() + b"\n"
                )
                self._stop_pasta()
                return
            await asyncio.sleep(0.001)

    async def _open_forwards(self, init_pid: int) -> None:
        """The host ports this sandbox is meant to reach, on its own loopback
        (`network`); closed with it (`_supervise`)."""
        if not self.spec.forwards or self._ending():
            return
        failed = await self._forwards.open(init_pid, self.spec.forwards)
        if failed:
            what = ", ".join(failed)
            self.stderr.append(f"[prefect-modal local] cannot forward to it: {what}\n".encode())
        if self._ending():  # it ended meanwhile: its end may have closed them already
            await self._forwards.close()

    def _ending(self) -> bool:
        """Whether the sandbox has ended or is being ended (terminate, timeout, stop)."""
        return self.done.is_set() or self._kill_requested.is_set()

    def _stop_pasta(self) -> None:
        proc, self._pasta = self._pasta, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._spawn_background(asyncio.to_thread(proc.wait))

    async def wait_init(self) -> int:
        """The pid the container is reached through (`init_pid`) once its root is built;
        raises if it has finished."""
        await self._container_up.wait()
        if self.init_pid is None or self.done.is_set():
            raise SandboxFinishedError(f"Sandbox {self.id} has finished")
        return self.init_pid

    async def fs_root(self) -> FsRoot:
        """Where the file API resolves this sandbox's paths (close it after use)."""
        if self.isolation is None:
            return FsRoot.of_directory(self.paths.fs)
        try:
            idmap = self.isolation.idmap
            owner = idmap.root if idmap is not None and os.geteuid() == 0 else None
            return FsRoot.of_container(await self.wait_init(), owner)
        except (SandboxFinishedError, FileNotFoundError, ProcessLookupError) as exc:
            raise OSError(2, f"Sandbox {self.id} has finished") from exc

    async def open_connection(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``port`` on the sandbox's loopback, from the server.

        The only way the server reaches a sandbox's ports (tunnels, connect
        tokens, tcp readiness probes): a sandbox with a network namespace of its
        own is reached inside it (`isolation.socket_in_netns`); one that shares
        this machine's network, on 127.0.0.1. A finished sandbox has no ports
        (whatever listens there now is not its).
        """
        if self.done.is_set():
            raise ConnectionRefusedError(f"sandbox {self.id} has finished")
        if self.isolation is None or self.spec.network == "host":
            return await asyncio.open_connection("127.0.0.1", port)
        init = await self.wait_init()
        sock = await asyncio.to_thread(isolation.socket_in_netns, init)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

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
                waiting: set[asyncio.Future[Any]] = {exited, kill_wait}
                await asyncio.wait(
                    waiting,
                    timeout=min(delay, cap),
                    return_when="FIRST_COMPLETED",
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
        self._stop_pasta()
        await self._remove_cgroup()
        await self._forwards.close()
        if self.init_pid is not None:
            await asyncio.to_thread(isolation.forget_netns, self.init_pid)

    def _spawn_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """Log a failure of background work at once: unobserved, asyncio would only
        mention it when the task is garbage-collected, long after and out of context."""
        self._background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "sandbox %s: background work failed: %s: %s",
                self.id,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    def _finish(self, status: str, code: int) -> None:
        if self.done.is_set():
            return
        status, code = self._note_memory(status, code)
        self.status = status
        self.returncode = code
        self.finished_at = time.time()
        for ex in self.execs.values():
            if not ex.done.is_set():
                ex.finish(sig=signal.SIGKILL)
            ex.stdout.close()
            ex.stderr.close()
        self._merge_volume_views()
        self.done.set()
        self._on_change()

    def _note_memory(self, status: str, code: int) -> tuple[str, int]:
        """Its peak memory and, if the kernel killed it for its memory limit, that
        reason: it ends as on Modal, exit code 137 (SIGKILL), with the reason in its
        result (``GenericResult.exception``) and its record."""
        group = self._group
        if group is None or group.removed:
            return ("exited" if status == "oom" else status), code
        peak = group.peak_memory()
        if peak is not None:
            self.memory_peak_mib = round(peak / 1048576, 1)
        if status == "oom" or (group.oom_kills() and status == "exited" and code == 137):
            limit = group.limits.memory_mib
            self.exit_reason = (
                f"Sandbox ran out of memory: OOM killed at its memory limit of {limit} MiB "
                f"(exit code 137)"
            )
            log.warning("sandbox %s: %s", self.id, self.exit_reason)
            return "exited", 137
        return ("exited" if status == "oom" else status), code

    def _merge_volume_views(self) -> None:
        """v1 volumes receive the sandbox's writes now, at its end, before anyone hears
        it ended (so a reader after ``wait()`` sees them, as on Modal). Blocking, in
        proportion to what the sandbox changed; a failure is logged, never raised."""
        for mount_path, v in self.spec.volume_views.items():
            try:
                merge_view(v)
            except OSError as exc:
                log.warning(
                    "sandbox %s: its writes to the v1 volume at %s could not all be "
                    "merged into the volume: %s",
                    self.id,
                    mount_path,
                    exc,
                )

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
        """Called with `_stdin_lock` held."""
        if self._stdin_closed:
            return
        self._stdin_closed = eof
        if self._child is None or not self._stdin_ready:
            if not self.done.is_set():  # not started yet: kept for the entrypoint
                self._early_stdin.append((data, eof))
            return
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

    def add_exec(self, exec_id: str) -> ExecProcess | None:
        """A new exec answered by the server itself (the file API); None if it exists."""
        if exec_id in self.execs:
            return None
        ex = ExecProcess(exec_id, self.paths)
        self.execs[exec_id] = ex
        self.touch()
        return ex

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
        pty_size: tuple[int, int] | None = None,
    ) -> ExecProcess:
        """Start a command in this sandbox (idempotent per ``exec_id``).

        ``pty_size`` (rows, columns; an isolated sandbox only) gives it a
        pseudo-terminal for stdin, stdout and stderr, as ``pty_info`` asks."""
        if exec_id in self.execs:
            return self.execs[exec_id]
        ex = ExecProcess(exec_id, self.paths)
        self.execs[exec_id] = ex
        self.touch()
        full_env = dict(self._env)
        full_env.update(env)
        popen: subprocess.Popen[bytes] | ForkedProcess | None
        try:
            if self.isolation is not None:
                assert self._forkserver is not None
                init = await self.wait_init()
                popen = await self._forkserver.spawn(
                    args,
                    env=full_env,
                    cwd=workdir or self.spec.workdir or "/",
                    stdio=(
                        Stdio.pty(*pty_size, devpts=f"/proc/{init}/root/dev/pts")
                        if pty_size is not None
                        else Stdio.pipes(stdout, stderr, merge_stderr)
                    ),
                    rlimit_as_bytes=self._rlimit_as(),
                    cgroup_procs=self._cgroup_procs(),
                    join=init,
                    pty=pty_size is not None,
                )
            else:
                cwd = self.paths.resolve(workdir or self.spec.workdir or "/")
                problem = _make_workdir(str(cwd), workdir or self.spec.workdir or "/")
                if problem is not None:
                    ex.stderr.append(f"[prefect-modal local] {problem}\n".encode())
                    ex.stdout.close()
                    ex.stderr.close()
                    ex.finish(code=container.WORKDIR_FAILED)
                    return ex
                popen = processes.spawn(
                    args,
                    env=full_env,
                    cwd=str(cwd),
                    rlimit_as_bytes=self._rlimit_as(),
                    cgroup_procs=self._cgroup_procs(),
                    stdout=stdout,
                    stderr=stderr,
                    merge_stderr=merge_stderr,
                )
            assert popen is not None
        except (OSError, SandboxFinishedError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            ex.stderr.append(f"[prefect-modal local] cannot start {args[0]!r}: {why}\n".encode())
            ex.stdout.close()
            ex.stderr.close()
            ex.finish(code=127 if isinstance(exc, FileNotFoundError) else 126)
            return ex
        ex.child = processes.Child(popen)
        await ex.child.attach(ex.stdout, ex.stderr)
        self._running_execs += 1
        self._spawn_background(self._supervise_exec(ex, timeout_s))
        return ex

    async def _supervise_exec(self, ex: ExecProcess, timeout_s: float | None) -> None:
        child = ex.child
        assert child is not None
        exited = asyncio.ensure_future(child.wait_exited())
        try:
            try:
                await asyncio.wait_for(asyncio.shield(exited), timeout_s if timeout_s else None)
            except asyncio.TimeoutError:
                ex.timed_out = True
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
