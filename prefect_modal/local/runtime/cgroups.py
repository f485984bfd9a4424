"""Sandbox limits (memory, cpu, pids) with the kernel's cgroups, where this machine allows.

One mechanism, one narrow interface:

* `Cgroups.probe` (once, at server start): which controllers this server can
  use, and the sentence that says so (`Cgroups.announcement`) or why not
  (`Cgroups.why_not`);
* `Cgroups.create`: a sandbox's group with its limits (a `Group`); its
  `Group.procs` are the ``cgroup.procs`` files the sandbox's first process
  writes ``0`` to (`container.join_cgroups`, in the fork server's child, before
  it unshares or forks: so every process of the sandbox is born inside, and
  nothing started before the move can stay outside, which a move made by the
  server after the start could not promise);
* `Group.oom_kills`, `Group.peak_memory`, `Group.oom_eventfd`: what the kernel
  says about its memory;
* `Group.remove` when the sandbox ends (kills what is left, then removes the
  directory) and `Cgroups.close` when the server stops.

Two layouts, neither changed (the host's cgroup layout is never touched, only
directories of our own are made where we may):

* **cgroup v1** (and the hybrid layout: v1 controllers plus an empty unified
  tree, as on this project's CI): as root, a parent per server under the
  server's *own* cgroup in each controller's hierarchy
  (``<mount>/<own path>/prefect-modal-<pid>-<id>``), one child per sandbox.
  Nesting under its own group keeps the server's sandboxes inside whatever
  limits its own launcher gave it. A normal user cannot write there: limits
  are then announced as not enforced.
* **cgroup v2** (unified): the nearest cgroup, from the server's own up, that
  already delegates the controllers to its children (``cgroup.subtree_control``)
  and that this user may write: the root's children as root, or a delegated
  subtree (systemd's ``user@UID.service``, ``Delegate=yes``) as a normal user.
  ``memory.oom.group`` makes an OOM kill end the whole sandbox, as on Modal.

What a limit means here (`SandboxLimits.of`): Modal's hard limits when the
sandbox asks for them (``memory=(request, limit)``, ``cpu=(request, limit)``),
else by default its request, which is stricter than Modal (a setting gives
Modal's looser rule; see `SandboxLimits.of`); and a pids limit, which Modal does
not publish (`DEFAULT_PIDS_LIMIT`, an assumption).

Not imported by the fork server: `container.join_cgroups` is the only part that
runs there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("prefect_modal.local")

#: Where cgroup file systems are mounted, unless a setting says otherwise
#: (`limits.CGROUP_ROOT_ENV`; a test points it at a directory with none).
DEFAULT_ROOT = "/sys/fs/cgroup"

#: Processes and threads one sandbox may have at once (``pids.max``). Modal
#: publishes no number; this is our assumption: far above what a flow run, a
#: build or a browser needs (a few hundred threads), far below what takes a
#: machine down (a fork bomb; 2,000 processes started before limits existed).
#: A setting changes it (`limits.PIDS_LIMIT_ENV`).
DEFAULT_PIDS_LIMIT = 1024

#: Modal's soft cpu limit is the request plus this many cores (its guide, "Resources")
MODAL_CPU_SOFT_LIMIT_ABOVE = 4.0

#: How the line a sandbox's log starts with where its limits are not all enforced begins
#: (`Cgroups.sandbox_notice`); the reason follows
LIMITS_NOTICE = "[prefect-modal local] this sandbox's limits are not all enforced here: "

CONTROLLERS = ("memory", "cpu", "pids")
_CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel's lower bound for a cfs quota
_PREFIX = "prefect-modal-"
_REMOVE_WAIT_S = 5.0


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandbox's group enforces; None is no limit."""

    memory_mib: int | None = None
    memory_request_mib: int | None = None
    cpu: float | None = None
    cpu_request: float | None = None
    pids: int | None = None

    @classmethod
    def of(
        cls,
        *,
        cpu: float | None,
        cpu_max: float | None,
        memory_mib: int | None,
        memory_max_mib: int | None,
        pids: int | None,
        strict_requests: bool = True,
    ) -> SandboxLimits:
        """The limits of a create request, as the modal client sends them
        (``modal/_resources.py``: ``cpu=(request, limit)`` is ``milli_cpu`` and
        ``milli_cpu_max``, ``memory=(request, limit)`` is ``memory_mb`` and
        ``memory_mb_max``; a single number sends the request and 0 for the limit).

        The hard limit is the one asked for. With a request only, Modal lets a
        container go above it when its worker has room (its guide, "Resources":
        containers "can exceed this minimum if the worker has available CPU or
        memory"; cpu has a soft limit of the request plus 4 cores). Here, with
        ``strict_requests`` (the default), the request is the limit: this
        machine's room is the user's own machine, and a flow that fits its
        request here fits it on Modal whatever room its worker has. Without it,
        Modal's rule: no memory limit, and a cpu limit of the request plus 4 cores.
        """
        if strict_requests:
            memory_limit, cpu_limit = memory_max_mib or memory_mib, cpu_max or cpu
        else:
            memory_limit = memory_max_mib
            cpu_limit = cpu_max or ((cpu + MODAL_CPU_SOFT_LIMIT_ABOVE) if cpu else None)
        return cls(
            memory_mib=memory_limit or None,
            memory_request_mib=memory_mib or None,
            cpu=cpu_limit or None,
            cpu_request=cpu or None,
            pids=pids or None,
        )

    def wanted(self) -> set[str]:
        """The controllers these limits need."""
        need = set()
        if self.memory_mib:
            need.add("memory")
        if self.cpu:
            need.add("cpu")
        if self.pids:
            need.add("pids")
        return need

    def describe(self) -> dict[str, float]:
        """For the sandbox's record: the limits, in MiB, cores and processes."""
        out: dict[str, float] = {}
        if self.memory_mib:
            out["memory_mib"] = self.memory_mib
        if self.cpu:
            out["cpu"] = self.cpu
        if self.pids:
            out["pids"] = self.pids
        return out


@dataclass(frozen=True)
class _Mount:
    point: str  # where it is mounted
    root: str  # the cgroup it shows at that point
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: its controllers; v2: empty (read from the tree)


def _mounts(root: str) -> list[_Mount]:
    """The cgroup file systems mounted under ``root`` (from this process's mountinfo)."""
    found: list[_Mount] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    prefix = root.rstrip("/") + "/"
    for line in lines:
        left, _sep, right = line.partition(" - ")
        fields_ = left.split()
        rest = right.split()
        if len(fields_) < 5 or len(rest) < 3:
            continue
        fstype, point = rest[0], fields_[4]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        if point != root.rstrip("/") and not point.startswith(prefix):
            continue
        options = set(rest[2].split(","))
        found.append(
            _Mount(
                point=point,
                root=fields_[3],
                version=2 if fstype == "cgroup2" else 1,
                controllers=frozenset(c for c in CONTROLLERS if c in options),
            )
        )
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and ``""`` -> its v2 cgroup."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        _num, _sep, rest = line.partition(":")
        names, _sep, path = rest.partition(":")
        if not names:
            own[""] = path
        for name in names.split(","):
            own[name] = path
    return own


def _under(mount: _Mount, path: str) -> Path:
    """The directory of cgroup ``path`` in ``mount`` (which may show a subtree only)."""
    rel = os.path.relpath(path, mount.root) if mount.root != "/" else path.lstrip("/")
    if rel.startswith(".."):  # our cgroup is outside what is mounted here
        return Path(mount.point)
    return Path(mount.point) / rel if rel != "." else Path(mount.point)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed(text: str, key: str) -> int:
    """``key N`` from a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    for line in text.splitlines():
        name, _sep, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


def _why(exc: OSError, where: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"this user (uid {os.geteuid()}) may not create cgroups in {where}"
    if exc.errno == errno.EROFS:
        return "the cgroup file system is mounted read-only"
    return exc.strerror or str(exc)


def _kill_and_remove(directory: Path, deadline_s: float = _REMOVE_WAIT_S) -> bool:
    """Kill every process in ``directory``'s group (and groups below it), then remove
    them all, deepest first. True if it is gone. Blocking (a few ms, more while the
    killed processes exit): call it off the event loop."""
    if not directory.is_dir():
        return True
    children = [p for p in directory.iterdir() if p.is_dir()]
    for child in children:
        _kill_and_remove(child, deadline_s)
    kill_file = directory / "cgroup.kill"  # cgroup v2, Linux 5.14
    if kill_file.exists():
        with contextlib.suppress(OSError):
            _write(kill_file, "1")
    end = time.monotonic() + deadline_s
    delay = 0.001
    while True:
        pids = [int(p) for p in _read(directory / "cgroup.procs").split() if p.strip()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(directory)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > end:
                log.warning("could not remove the sandbox cgroup %s: %s", directory, exc)
                return False
        time.sleep(delay)  # dying processes leave the group within milliseconds
        delay = min(delay * 2, 0.05)


@dataclass
class Group:
    """One sandbox's cgroup: a directory per hierarchy (v1) or one directory (v2)."""

    version: int
    dirs: dict[str, Path]  # controller -> its directory ("" for v2's one directory)
    limits: SandboxLimits
    _eventfd: int | None = field(default=None, repr=False)
    removed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes ``0`` to, to join the group."""
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def _memory_dir(self) -> Path | None:
        return self.dirs.get("memory") or self.dirs.get("")

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group for its memory limit."""
        d = self._memory_dir()
        if d is None:
            return 0
        if self.version == 2:
            return _keyed(_read(d / "memory.events"), "oom_kill")
        return _keyed(_read(d / "memory.oom_control"), "oom_kill")

    def peak_memory(self) -> int | None:
        """The most memory the group held at once, in bytes (None: the kernel does not say)."""
        d = self._memory_dir()
        if d is None:
            return None
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = _read(d / name).strip()
        return int(text) if text.isdigit() else None

    @property
    def eventfd(self) -> int | None:
        """The eventfd `oom_eventfd` made, while open (the server's loop watches it)."""
        return self._eventfd

    def oom_eventfd(self) -> int | None:
        """cgroup v1: an eventfd that becomes readable at each OOM in the group (the
        server ends the whole sandbox then, as cgroup v2's ``memory.oom.group`` does
        by itself). None on v2 or without a memory limit. Closed by `remove`."""
        if self.version != 1 or "memory" not in self.dirs or not self.limits.memory_mib:
            return None
        if self._eventfd is None:
            d = self.dirs["memory"]
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ctl = os.open(d / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(d / "cgroup.event_control", f"{efd} {ctl}")
            except OSError:
                os.close(efd)
                return None
            finally:
                os.close(ctl)
            self._eventfd = efd
        return self._eventfd

    def remove(self) -> None:
        """Kill what is left in the group and remove its directories (blocking; the
        sandbox's end and the server's stop may both call it, from two threads)."""
        with self._lock:
            if self._eventfd is not None:
                os.close(self._eventfd)
                self._eventfd = None
            if self.removed:
                return
            for d in dict.fromkeys(self.dirs.values()):
                _kill_and_remove(d)
            self.removed = True


class Cgroups:
    """This server's cgroups: what it can enforce, its parent groups, its sandboxes' groups."""

    def __init__(
        self,
        version: int,
        parents: dict[str, Path],
        *,
        pids_limit: int | None,
        missing: dict[str, str],
    ) -> None:
        self.version = version  # 0: none usable
        self.parents = parents  # controller -> the server's parent group ("" for v2)
        self.pids_limit = pids_limit
        #: a request alone is the limit (`SandboxLimits.of`); set by the server
        self.strict_requests = True
        #: controller -> why it cannot be enforced here
        self.missing = missing
        self.groups: dict[str, Group] = {}

    @property
    def enforced(self) -> list[str]:
        return [c for c in CONTROLLERS if c not in self.missing]

    @property
    def why_not(self) -> str | None:
        """Why some limits are not enforced (None: all are)."""
        if not self.missing:
            return None
        reasons = dict.fromkeys(self.missing.values())
        return f"{', '.join(self.missing)} not enforced: {'; '.join(reasons)}"

    def announcement(self) -> str:
        """The sentence the server says once, at start."""
        if not self.missing:
            where = ", ".join(sorted({str(p) for p in self.parents.values()}))
            return (
                f"sandbox limits are enforced with cgroup v{self.version} (memory, cpu, and "
                f"pids at {self.pids_limit or 'no limit'}): {where}"
            )
        enforced = self.enforced
        return (
            "the local Modal server cannot enforce some sandbox limits: "
            f"{self.why_not}. "
            + (f"Enforced: {', '.join(enforced)}. " if enforced else "")
            + (
                "memory=(request, limit) falls back to an address-space limit (RLIMIT_AS); "
                if "memory" in self.missing
                else ""
            )
            + "see docs/local-server.md, 'Sandbox limits'"
        )

    def sandbox_notice(self) -> str:
        """The line each sandbox's log starts with when some limits are not enforced."""
        if not self.missing:
            return ""
        return f"{LIMITS_NOTICE}{self.why_not}\n"

    # ----- probe -------------------------------------------------------------

    @classmethod
    def probe(
        cls,
        server_id: str,
        *,
        root: str = DEFAULT_ROOT,
        pids_limit: int | None = DEFAULT_PIDS_LIMIT,
    ) -> Cgroups:
        """Find what this server can enforce and make its parent group(s).

        Never raises: what cannot be had is in `missing`, with why. Leftover
        parents of servers that are gone (a crash) are removed on the way.
        """
        mounts = _mounts(root)
        if not mounts:
            why = f"no cgroup file system is mounted at {root}"
            return cls(0, {}, pids_limit=pids_limit, missing=dict.fromkeys(CONTROLLERS, why))
        name = f"{_PREFIX}{os.getpid()}-{server_id}"
        v1 = {c: m for m in mounts if m.version == 1 for c in m.controllers}
        if v1:
            return cls._probe_v1(name, v1, pids_limit, root)
        return cls._probe_v2(name, next(m for m in mounts if m.version == 2), pids_limit)

    @classmethod
    def _probe_v1(
        cls, name: str, v1: dict[str, _Mount], pids_limit: int | None, root: str
    ) -> Cgroups:
        own = _own_paths()
        parents: dict[str, Path] = {}
        missing: dict[str, str] = {}
        for controller in CONTROLLERS:
            mount = v1.get(controller)
            if mount is None:
                missing[controller] = f"no cgroup v1 hierarchy has the {controller} controller"
                continue
            base = _under(mount, own.get(controller, "/"))
            _sweep(base)
            parent = base / name
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                # one reason for all three, as a rule (their paths go to the debug log)
                log.debug("cgroup v1 %s at %s: %s", controller, base, exc)
                missing[controller] = _why(exc, f"the cgroup v1 hierarchies under {root}")
                continue
            parents[controller] = parent
        return cls(1 if parents else 0, parents, pids_limit=pids_limit, missing=missing)

    @classmethod
    def _probe_v2(cls, name: str, mount: _Mount, pids_limit: int | None) -> Cgroups:
        own = _own_paths().get("", "/")
        # from our own cgroup up: the nearest that already gives its children the
        # controllers (we never enable them on a group of the host's ourselves)
        candidate = _under(mount, own)
        top = Path(mount.point)
        problems: list[str] = []
        while True:
            delegated = set(_read(candidate / "cgroup.subtree_control").split())
            have = [c for c in CONTROLLERS if c in delegated]
            if have:
                _sweep(candidate)
                parent = candidate / name
                try:
                    parent.mkdir(exist_ok=True)
                    # our parent holds no process, so it may hand them on to each sandbox
                    _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in have))
                except OSError as exc:
                    problems.append(_why(exc, str(candidate)))
                    with contextlib.suppress(OSError):
                        parent.rmdir()
                else:
                    missing = {
                        c: f"cgroup v2 at {candidate} does not delegate the {c} controller"
                        for c in CONTROLLERS
                        if c not in have
                    }
                    return cls(2, {"": parent}, pids_limit=pids_limit, missing=missing)
            if candidate == top or candidate.parent == candidate:
                break
            candidate = candidate.parent
        why = (
            "no cgroup v2 group from this server's own up delegates controllers to it"
            + (f" ({'; '.join(problems)})" if problems else "")
            + "; run the server in a delegated cgroup (e.g. systemd-run --user --scope "
            "-p Delegate=yes ...)"
        )
        return cls(0, {}, pids_limit=pids_limit, missing=dict.fromkeys(CONTROLLERS, why))

    # ----- sandboxes ---------------------------------------------------------

    def create(self, sandbox_id: str, limits: SandboxLimits) -> Group | None:
        """A group for a sandbox, with the limits this server can enforce (None: no
        controller usable here). Raises OSError when the group cannot be made."""
        if not self.parents:
            return None
        limits = replace(limits, pids=self.pids_limit)
        if self.version == 2:
            d = self.parents[""] / sandbox_id
            self._mkdir(d)
            group = Group(2, {"": d}, limits)
            try:
                _set_v2(d, limits, set(self.enforced))
            except OSError:
                group.remove()
                raise
        else:
            dirs: dict[str, Path] = {}
            group = Group(1, dirs, limits)
            try:
                for controller, parent in self.parents.items():
                    d = parent / sandbox_id
                    self._mkdir(d)
                    dirs[controller] = d
                _set_v1(dirs, limits)
            except OSError:
                group.remove()
                raise
        self.groups[sandbox_id] = group
        return group

    def _mkdir(self, d: Path) -> None:
        """Make a sandbox's directory; its parent again if it went (`_sweep` of a
        server in another PID namespace, which cannot tell that we live)."""
        try:
            d.mkdir()
        except FileNotFoundError:
            d.parent.mkdir()
            if self.version == 2:
                have = " ".join(f"+{c}" for c in self.enforced)
                _write(d.parent / "cgroup.subtree_control", have)
            d.mkdir()

    def forget(self, sandbox_id: str) -> None:
        """The sandbox's group was removed (`Group.remove`)."""
        self.groups.pop(sandbox_id, None)

    def close(self) -> None:
        """Server stop: kill and remove every group left, then the parents (blocking)."""
        for group in list(self.groups.values()):
            group.remove()
        self.groups.clear()
        for parent in dict.fromkeys(self.parents.values()):
            _kill_and_remove(parent)


def _set_v1(dirs: dict[str, Path], limits: SandboxLimits) -> None:
    mem = dirs.get("memory")
    if mem is not None and limits.memory_mib:
        limit = limits.memory_mib * 1024 * 1024
        _write(mem / "memory.limit_in_bytes", str(limit))
        swap = mem / "memory.memsw.limit_in_bytes"
        if swap.exists():  # swap accounting: memory plus swap, so swap is no way round it
            _write(swap, str(limit))
        if limits.memory_request_mib and limits.memory_request_mib < limits.memory_mib:
            soft = limits.memory_request_mib * 1024 * 1024
            _write(mem / "memory.soft_limit_in_bytes", str(soft))
    cpu = dirs.get("cpu")
    if cpu is not None and limits.cpu:
        quota = max(_MIN_QUOTA_US, round(limits.cpu * _CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_period_us", str(_CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.cpu_request:
            _write(cpu / "cpu.shares", str(max(2, round(limits.cpu_request * 1024))))
    pids = dirs.get("pids")
    if pids is not None and limits.pids:
        _write(pids / "pids.max", str(limits.pids))


def _set_v2(d: Path, limits: SandboxLimits, usable: set[str]) -> None:
    if "memory" in usable and limits.memory_mib:
        _write(d / "memory.max", str(limits.memory_mib * 1024 * 1024))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        if (d / "memory.oom.group").exists():  # an OOM kill ends the whole sandbox
            _write(d / "memory.oom.group", "1")
    if "cpu" in usable and limits.cpu:
        quota = max(_MIN_QUOTA_US, round(limits.cpu * _CFS_PERIOD_US))
        _write(d / "cpu.max", f"{quota} {_CFS_PERIOD_US}")
        if limits.cpu_request:
            weight = min(10000, max(1, round(limits.cpu_request * 100)))
            _write(d / "cpu.weight", str(weight))
    if "pids" in usable and limits.pids:
        _write(d / "pids.max", str(limits.pids))


_PARENT = re.compile(rf"{re.escape(_PREFIX)}(\d+)-[0-9a-f]+")


def _sweep(base: Path) -> None:
    """Remove the empty parent groups of local servers whose process is gone (a crash
    left them). Only empty ones, and nothing is killed: a server in another PID
    namespace looks gone from here, and its groups are not ours to end (if one of
    its idle parents goes, it makes it again: `Cgroups.create`)."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _PARENT.fullmatch(entry.name)
        if m is None or not entry.is_dir() or Path(f"/proc/{m.group(1)}").exists():
            continue
        _remove_empty(entry)


def _remove_empty(directory: Path) -> None:
    """rmdir ``directory`` and the groups below it, deepest first; one that still has
    processes stays (and so does everything above it)."""
    with contextlib.suppress(OSError):
        for child in directory.iterdir():
            if child.is_dir():
                _remove_empty(child)
        directory.rmdir()
