"""What a local sandbox's container is made of, and how the server reaches into one.

The server side of `container` (which runs in the fork server's child):

* `ImageView` - the directories of this machine that stand in for the image
  until images are built from their definition: the Debian userland
  (``/usr``, ``/bin``, ``/lib*``, ``/sbin``, and of ``/etc`` only what
  `etc_view.ETC_ALLOWED` names) and this server's Python
  environment (its prefixes, ``sys.path`` and editable installs), all
  read-only at their own paths; plus ``host_dirs``, directories the operator
  chose to show read-only (the local stand-in for an image that holds your
  code: a deployment's working directory in pipeline mode).
* `layout` - one sandbox's container spec: that view, its volumes, its own
  writable root, its network mode.
* `open_in_root` / `connect_in_netns` - the file API and tunnels act *inside*
  a sandbox: paths are resolved by the kernel with the sandbox's root as
  ``/`` (``openat2`` with ``RESOLVE_IN_ROOT``: a symlink the sandbox made
  cannot point the server at a host file), sockets are made in its network
  namespace.

Isolation needs the namespace calls: as root, or as a normal user through a
user namespace per sandbox (`userns`); `why_not_isolated` and the fork
server's self-test tell. Without them the server says so once, every sandbox
says so in its first log line, and what cannot be had is refused
(`NETWORK_NEEDS_ISOLATION`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import posixpath
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import etc_view
from .layers import overlay_workdir
from .netns_sockets import NetnsSockets

log = logging.getLogger("prefect_modal.local")

ENV_SWITCH = "PREFECT_MODAL_LOCAL_ISOLATION"
HOST_DIRS_ENV = "PREFECT_MODAL_LOCAL_HOST_DIRS"

#: Top-level directories of the host's userland shown read-only (when they are
#: directories; merged-/usr symlinks such as /bin -> usr/bin are made as symlinks).
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Host files and directories under the view that hold secrets: hidden.
MASKED = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
)
#: Directories every sandbox root has, with their modes (the rest of a Debian tree).
ROOT_DIRS = {
    "root": 0o700,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "run": 0o755,
    "home": 0o755,
    "mnt": 0o755,
    "opt": 0o755,
    "srv": 0o755,
    "sys": 0o555,
}

NOT_ISOLATED_NOTICE = (
    "[prefect-modal local] this sandbox is NOT isolated: it shares this machine's files, "
    "processes and network (the local server runs without Linux namespaces: {why}). "
    "See the README, 'The local Modal server'.\n"
)


def enabled_by_default() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def host_dirs_from_env() -> list[str]:
    value = os.environ.get(HOST_DIRS_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def why_not_isolated(requested: bool) -> str | None:
    """None if this machine can isolate sandboxes, else the reason in a few words.

    As root the namespace calls need nothing more; as a normal user they need a
    user namespace (`why_no_userns`). The fork server's self-test has the last word."""
    if not requested:
        return "turned off (isolation=False, --no-isolation or PREFECT_MODAL_LOCAL_ISOLATION=0)"
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} has no Linux namespaces"
    if os.geteuid() != 0:
        return why_no_userns()
    return None


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", name).read_text().strip())
    except (OSError, ValueError):
        return None


def why_no_userns() -> str | None:
    """None if this kernel lets this process make user namespaces, else why not and
    the setting that changes it (read from ``/proc/sys``; a setting we cannot read
    is no reason)."""
    if not os.path.exists("/proc/self/ns/user"):
        return "this kernel has no user namespaces (CONFIG_USER_NS)"
    if _sysctl("user/max_user_namespaces") == 0:
        return (
            "user namespaces are turned off (/proc/sys/user/max_user_namespaces is 0; "
            "`sudo sysctl user.max_user_namespaces=15000` turns them on)"
        )
    if os.geteuid() == 0:
        return None
    if _sysctl("kernel/unprivileged_userns_clone") == 0:
        return (
            "this kernel refuses user namespaces to normal users "
            "(`sudo sysctl kernel.unprivileged_userns_clone=1` allows them)"
        )
    if _sysctl("kernel/apparmor_restrict_unprivileged_userns") == 1:
        return (
            "AppArmor restricts user namespaces of normal users "
            "(`sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor "
            "profile that allows `userns` for this Python)"
        )
    return None


def refused_because() -> str:
    """What the fork server's self-test failing means, for this user."""
    if os.geteuid() == 0:
        return "this machine refused the namespace calls (a container without privileges?)"
    return (
        "this machine refused a user namespace with its own mounts and /proc (a container "
        "whose /proc is partly hidden, or a seccomp profile that refuses unshare?)"
    )


# ----- the image view ---------------------------------------------------------------


_ENV_PROBE = r"""
import json, sys, os, ast, glob, site
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
paths += [p for p in sys.path if p]
for sp in site.getsitepackages():
    for finder in glob.glob(os.path.join(sp, "__editable___*_finder.py")):
        text = open(finder, encoding="utf-8").read()
        for line in text.splitlines():
            if line.startswith("MAPPING"):
                try:
                    paths += list(ast.literal_eval(line.split("=", 1)[1].strip()).values())
                except Exception:
                    pass
print(json.dumps(paths))
"""


@functools.lru_cache(maxsize=4)
def python_environment(executable: str) -> tuple[str, ...]:
    """The directories ``executable``'s environment imports from (a fresh ``-I``
    interpreter's view: no PYTHONPATH, no current directory), outermost only."""
    try:
        out = subprocess.run(
            [executable, "-I", "-c", _ENV_PROBE], capture_output=True, text=True, timeout=60
        ).stdout
        found = [os.path.realpath(p) for p in json.loads(out)]
    except (OSError, subprocess.SubprocessError, ValueError):
        found = [sys.prefix, sys.base_prefix]
    found += [os.path.abspath(sys.prefix), os.path.abspath(sys.base_prefix)]  # unresolved too
    return tuple(_outermost(p for p in found if os.path.isdir(p)))


def _outermost(paths: Iterable[str]) -> list[str]:
    kept: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@dataclass
class ImageView:
    """The host directories every sandbox sees read-only at their own paths.

    ``sources``: a directory shown from elsewhere than its own path (container
    path -> host directory): ``/etc`` from the allow-listed copy `etc_view.stage_etc` made."""

    dirs: list[str]
    symlinks: dict[str, str]
    masked: list[str]
    host_dirs: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, path: str) -> str:
        """The host directory bound at ``path``, a directory of the view."""
        return self.sources.get(path, path)

    @classmethod
    def of_this_machine(
        cls, state_dir: Path, host_dirs: Sequence[str] = (), etc_source: str | None = None
    ) -> ImageView:
        """This machine's view; its /etc is staged under ``state_dir`` from
        ``etc_source`` (default `etc_view.ETC_SOURCE`, the host's /etc)."""
        state = os.path.realpath(state_dir)
        dirs: list[str] = []
        symlinks: dict[str, str] = {}
        sources: dict[str, str] = {}
        for top in SYSTEM_DIRS:
            if os.path.islink(top):
                symlinks[top] = os.readlink(top)
            elif os.path.isdir(top):
                dirs.append(top)
        if "/etc" in dirs:
            staged = Path(state) / "etc-view"
            etc_view.stage_etc(etc_source or etc_view.ETC_SOURCE, staged)
            sources["/etc"] = str(staged)
        env = [p for p in python_environment(sys.executable) if not _under(p, dirs)]
        shown: list[str] = []
        for p in _outermost([*dirs, *env]):
            if _under(state, [p]):
                log.warning(
                    "the local server's state directory %s is inside %s, which sandboxes see "
                    "as part of the Python environment: it is left out of their view",
                    state,
                    p,
                )
                continue
            shown.append(p)
        extra = []
        for d in host_dirs:
            real = os.path.realpath(d)
            if not os.path.isdir(real):
                raise ValueError(f"host_dirs: {d!r} is not a directory")
            if _under(state, [real]):
                raise ValueError(
                    f"host_dirs: {d!r} contains the local server's state directory {state}"
                )
            extra.append(real)
        view = cls(
            dirs=shown, symlinks=symlinks, masked=[], host_dirs=_outermost(extra), sources=sources
        )
        view.masked = view._masked(shown)
        return view

    def _masked(self, dirs: Sequence[str]) -> list[str]:
        """`MASKED` paths of the host under the view's directories. The staged /etc
        has none of them; masked all the same, they stay hidden where an image's
        layer brings its own (an ``/etc/shadow``), as before the allow list."""
        return [m for m in MASKED if _under(m, dirs) and os.path.lexists(m)]

    def _host_path(self, path: str) -> str:
        for d, src in self.sources.items():
            if _under(path, [d]):
                return src + path[len(d) :]
        return path

    def for_image(self, ro_dirs: Sequence[str]) -> ImageView:
        """The view of a built image: this machine's userland (not the server's
        Python environment) plus the image's ``ro_dirs`` (its Python's prefix and
        its own environment), and the operator's ``host_dirs``."""
        userland = [d for d in self.dirs if _under(d, SYSTEM_DIRS)]
        dirs = _outermost([*userland, *ro_dirs])
        view = ImageView(
            dirs=dirs,
            symlinks=dict(self.symlinks),
            masked=[],
            host_dirs=list(self.host_dirs),
            sources={d: s for d, s in self.sources.items() if d in dirs},
        )
        view.masked = view._masked(dirs)
        return view

    def resolve_readonly(self, path: str) -> str | None:
        """The host path behind a sandbox path inside the view, else None."""
        for d in (*self.dirs, *self.host_dirs):
            if _under(path, [d]):
                return self._host_path(path)
        return None


def prepare_root(root: Path, view: ImageView) -> None:
    """A new sandbox's writable layer: the directories a Debian root has, the
    view's symlinks (``/bin -> usr/bin``), empty mount points."""
    root.mkdir(parents=True)
    for name, mode in ROOT_DIRS.items():
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
    for link, target in view.symlinks.items():
        os.symlink(target, root / link.lstrip("/"))


def layout(
    root: Path,
    view: ImageView,
    volumes: dict[str, Path],
    *,
    hostname: str,
    network: str,
    binds: dict[str, Path] | None = None,
    overlays: dict[str, list[str]] | None = None,
    uppers: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """The container spec `container.start` builds (JSON-able). Mounts are
    ordered so a parent is bound before what lies inside it. ``binds``: more
    read-only binds, container path -> host file or directory (local files).
    ``overlays``: view directories the image's layers add files to, container
    path -> the layers' directories there, top-most first (`layers.overlays`);
    such a directory is a read-only overlay of those over the host's.
    ``uppers``: for a build sandbox, view directories made writable, container
    path -> the upper directory that takes the changes (its overlay work
    directory is `overlay_workdir`, beside it); the host's files are never changed."""
    mounts: list[tuple[str, str | None, str]] = []
    over = overlays or {}
    up = uppers or {}
    for d in (*view.dirs, *view.host_dirs):
        src = view.source(d)
        if d in up:
            options = (
                f"lowerdir={overlay_lowerdir([*over.get(d, []), src])},"
                f"upperdir={overlay_lowerdir([str(up[d])])},"
                f"workdir={overlay_lowerdir([str(overlay_workdir(up[d]))])}"
            )
            mounts.append(("overlay_rw", options, d))
        elif d in over:
            mounts.append(("overlay", overlay_lowerdir([*over[d], src]), d))
        else:
            mounts.append(("ro", src, d))
    for target, source in (binds or {}).items():
        mounts.append(("ro", str(source), target))
    for m in view.masked:
        mounts.append(("mask", None, m))
    for mount_path, host_dir in volumes.items():
        mounts.append(("rw", str(host_dir), mount_path))
    mounts.sort(key=lambda m: m[2].count("/"))
    return {
        "root": str(root),
        "mounts": mounts,
        "hostname": hostname,
        "network": network,
    }


def overlay_lowerdir(dirs: Sequence[str]) -> str:
    """An overlay mount's ``lowerdir=`` value: ``dirs`` top-most first, with the
    characters overlayfs gives a meaning (``:`` separates, ``,`` ends the
    option, ``\\`` escapes) escaped."""
    escaped = []
    for d in dirs:
        for ch in "\\:,":
            d = d.replace(ch, "\\" + ch)
        escaped.append(d)
    return ":".join(escaped)


# ----- reaching into a running sandbox ------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_OPENAT2 = 437  # the same number on x86_64 and the generic table (aarch64...)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_CLONE_NEWNET = 0x40000000


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0o644) -> int:
    """``openat2(root_fd, path, RESOLVE_IN_ROOT)``: ``path`` (absolute or not) and every
    symlink on the way are resolved with ``root_fd`` as ``/``; ``..`` cannot climb out."""
    how = struct.pack(
        "QQQ",
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS,
    )
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path.lstrip("/") or "."), buf, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


class FsRoot:
    """Where the file API resolves a sandbox's paths.

    Isolated: ``fd`` is the container's ``/`` (its init's root) and the kernel
    resolves each path inside it (`open_in_root`). Not isolated: ``fd`` is the
    sandbox's root directory on the host and paths are plain relative paths
    under it (``..`` normalised away; its volume symlinks are followed).
    """

    def __init__(self, fd: int, in_root: bool, owner: tuple[int, int] | None = None) -> None:
        self.fd = fd
        self.in_root = in_root
        #: host uid and gid of the container's root, when that is not this server
        #: (`userns`): what the server creates there is given to it (`give`)
        self.owner = owner

    @classmethod
    def of_container(cls, init_pid: int, owner: tuple[int, int] | None = None) -> FsRoot:
        fd = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, in_root=True, owner=owner)

    def give(self, fd: int) -> None:
        """A file this server just created (it is still ours) becomes the container's root's,
        as a file Modal's file API writes is root's inside the sandbox."""
        if self.owner is not None and os.fstat(fd).st_uid == os.geteuid():
            os.fchown(fd, *self.owner)

    def give_at(self, dir_fd: int, name: str) -> None:
        """`give` for ``name`` in ``dir_fd`` (a directory just made); never follows a link."""
        if self.owner is not None:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if st.st_uid == os.geteuid():
                os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    @classmethod
    def of_directory(cls, path: Path) -> FsRoot:
        return cls(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), in_root=False)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if self.in_root:
            fd = open_in_root(self.fd, path, flags, mode)
            if flags & os.O_CREAT:
                self.give(fd)
            return fd
        rel = posixpath.normpath("/" + path).lstrip("/") or "."
        return os.open(rel, flags | os.O_CLOEXEC, mode, dir_fd=self.fd)

    @contextlib.contextmanager
    def opened(self, path: str, flags: int, mode: int = 0o644) -> Iterator[int]:
        """`open`, closed when the block ends."""
        fd = self.open(path, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.fd)


_netns_lock = threading.Lock()


#: a normal user's server: the socket broker of each sandbox reached so far (by the pid
#: the server reaches it through), ended by `forget_netns` when the sandbox ends
_brokers: dict[int, NetnsSockets] = {}


def forget_netns(init_pid: int) -> None:
    """End what `socket_in_netns` keeps for this sandbox (its end)."""
    with _netns_lock:
        broker = _brokers.pop(init_pid, None)
    if broker is not None:
        broker.close()


def socket_in_netns(init_pid: int, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket made inside a sandbox's network namespace (it stays there).

    As root, ``setns`` switches only the calling thread; this runs in a
    short-lived thread of its own, so no other code of the server ever runs in
    the sandbox's namespace. A normal user's server asks the sandbox's socket
    broker (`netns_sockets`), started on the first call.
    """
    if os.geteuid() != 0:
        with _netns_lock:
            broker = _brokers.get(init_pid)
            if broker is None:
                broker = _brokers[init_pid] = NetnsSockets(init_pid)
        return broker.socket(family)
    result: list[Any] = []

    def make() -> None:
        try:
            with open(f"/proc/{init_pid}/ns/net", "rb") as ns:
                if _libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            result.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:
            result.append(exc)

    with _netns_lock:
        t = threading.Thread(target=make, name="prefect-modal-netns")
        t.start()
        t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    sock: socket.socket = result[0]
    return sock


# ----- outbound network for sandboxes with a namespace of their own -------------------


@functools.lru_cache(maxsize=1)
def pasta() -> str | None:
    """``pasta`` (Debian package ``passt``): user-mode networking for a namespace.

    Its AVX2 build when the CPU has AVX2: pasta would exec that build itself
    (passt's ``arch_avx2_exec``), and pasta starts on the way to every
    sandbox's program, so the exec saved is a millisecond of each create."""
    exe = shutil.which("pasta")
    if exe is None:
        return None
    avx2 = exe + ".avx2"
    try:
        with open("/proc/cpuinfo") as f:
            has_avx2 = any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        has_avx2 = False
    return avx2 if has_avx2 and os.access(avx2, os.X_OK) else exe


def pasta_command(netns_fd: int, userns_fd: int | None = None) -> list[str]:
    """pasta, in the foreground, giving the network namespace open as ``netns_fd``
    (inherited) outbound access as the machine has it. Nothing of the host's
    loopback is forwarded in (that is the point of a namespace of its own) and
    no port of the namespace is published by pasta (tunnels do that).

    The namespace goes by an fd of ours, not ``/proc/<pid>/ns/net``: opening
    that would need ptrace rights over the container's init, which pasta,
    having dropped its capabilities, lacks while the init still has them.

    ``userns_fd``: the sandbox's user namespace, which pasta joins first; a
    normal user's pasta has no capability here and may enter the network
    namespace only from inside the user namespace that owns it. As root,
    pasta runs as uid 0 without capabilities (``--runas 0``)."""
    exe = pasta()
    assert exe is not None
    command = [
        exe,
        "--foreground",
        "--config-net",
        "--no-map-gw",
        "--quiet",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
    ]
    if os.geteuid() == 0:
        command += ["--runas", "0"]
    if userns_fd is not None:
        command += ["--userns", f"/proc/self/fd/{userns_fd}"]
    return [*command, "--netns", f"/proc/self/fd/{netns_fd}"]


def _is_v6_default_off_lo(fields: list[str]) -> bool:
    """A line of /proc/net/ipv6_route: ``::/0`` through a device that is not ``lo``
    (the link-local routes the kernel adds when a link comes up are not it)."""
    return len(fields) == 10 and fields[1] == "00" and fields[0] == "0" * 32 and fields[9] != "lo"


def has_outbound_route(init_pid: int | str) -> bool:
    """Whether the sandbox's network namespace has a route off its loopback yet
    (read from the host: /proc/<pid>/net/route and ipv6_route are that
    namespace's tables; an IPv6-only machine gets IPv6 routes only)."""
    try:
        with open(f"/proc/{init_pid}/net/route") as f:
            next(f, None)
            if any(line.split()[0] != "lo" for line in f if line.strip()):
                return True
        with open(f"/proc/{init_pid}/net/ipv6_route") as f:  # a default route, not lo's
            return any(_is_v6_default_off_lo(line.split()) for line in f)
    except OSError:
        return False


__all__ = [
    "ENV_SWITCH",
    "HOST_DIRS_ENV",
    "NOT_ISOLATED_NOTICE",
    "FsRoot",
    "ImageView",
    "enabled_by_default",
    "has_outbound_route",
    "host_dirs_from_env",
    "layout",
    "open_in_root",
    "overlay_lowerdir",
    "overlay_workdir",
    "pasta",
    "pasta_command",
    "prepare_root",
    "refused_because",
    "socket_in_netns",
    "why_no_userns",
    "why_not_isolated",
]
