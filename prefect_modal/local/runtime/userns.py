"""Which host ids a sandbox's ids are: the user namespace each isolated sandbox gets.

Root inside a sandbox is never root outside it. `container.start` makes the
user namespace (the monitor unshares it; a forked helper, still in this
machine's namespace, writes the maps: `container._enter_userns`); this module
chooses the maps and keeps the sandbox's writable directories owned by the
ids that are root inside.

* **As root**: one range of 65536 ids, shared by every sandbox of every local
  server on this machine: the first range of at least 65536 ids that
  ``/etc/subuid`` (``/etc/subgid``) gives ``root``, else `FALLBACK_BASE`
  (100000000-100065535: far above the ids Debian gives users and their
  ``/etc/subuid`` ranges, which start at 100000). Shared, not one per
  sandbox, because volumes and snapshots move files between sandboxes: a
  file one sandbox wrote must be the same owner in the next one (a second
  range would see it as ``nobody`` and could not write it). Sandboxes are
  kept apart by their mount, pid, ipc and network namespaces, not by ids.
  Root inside is `FALLBACK_BASE` (or the subuid base) outside: no capability
  over this machine's files, processes, keyrings or cgroups.
* **As a normal user**: the user is root inside. With a subordinate range in
  ``/etc/subuid`` and ``/etc/subgid`` and ``newuidmap``/``newgidmap``
  (Debian package ``uidmap``), ids 1..65535 inside are that range (what
  ``apt_install``'s dpkg needs: it gives files to other ids); without one,
  only root exists inside and a chown to another id fails (EINVAL), which
  `FULL_RANGE_FIX` explains.

Files a sandbox makes are owned on this machine by the ids above; as root the
server reads and writes them all. What the server makes for a sandbox to write
(its root, volume views, a build's upper directory) is given to root inside by
`own_tree` (as a normal user they are already the user's).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ids in a full range: what a Debian userland uses (dpkg gives files to ids up to 65534)
RANGE = 65536
#: the host id of root inside, as root, when /etc/subuid has no range for root
FALLBACK_BASE = 100_000_000
SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"

FULL_RANGE_FIX = (
    "this sandbox's user namespace maps only root (the local server runs as a normal user "
    "without a subordinate id range), so files cannot be given to other users or groups. "
    "To add one: `sudo apt-get install uidmap` and `sudo usermod --add-subuids "
    "100000-165535 --add-subgids 100000-165535 {user}` (or a line `{user}:100000:65536` in "
    "/etc/subuid and /etc/subgid), then restart the local server"
)

NO_USERNS_NOTICE = (
    "[prefect-modal local] this sandbox has no user namespace: root inside it is root on "
    "this machine (it has a container's capabilities, not all; the local server could not "
    "make user namespaces here, see its start-up message).\n"
)


@dataclass(frozen=True)
class IdMap:
    """A sandbox's uid and gid maps: lines of (inside, outside, count)."""

    uids: tuple[tuple[int, int, int], ...]
    gids: tuple[tuple[int, int, int], ...]
    #: newuidmap/newgidmap write the maps (a normal user's subordinate range)
    helpers: tuple[str, str] | None = None

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of root inside."""
        return self.uids[0][1], self.gids[0][1]

    @property
    def full(self) -> bool:
        """Whether ids 0..65535 all exist inside (chown to any Debian id works)."""
        return sum(n for _, _, n in self.uids) >= RANGE and sum(n for _, _, n in self.gids) >= RANGE

    @property
    def single(self) -> bool:
        """Only root exists inside: setgroups is denied (the kernel's rule for such a map)."""
        return not self.helpers and os.geteuid() != 0

    def spec(self) -> dict[str, Any]:
        """What `container._enter_userns` needs (JSON-able)."""
        return {
            "uid_map": [list(line) for line in self.uids],
            "gid_map": [list(line) for line in self.gids],
            "helpers": list(self.helpers) if self.helpers else None,
            "setgroups": not self.single,
        }

    def describe(self) -> str:
        uid, gid = self.root
        if os.geteuid() == 0:
            span = self.uids[0][2]
            return f"root inside is uid {uid} / gid {gid} outside (a range of {span} ids)"
        extra = "and ids 1-65535 are its subordinate range" if self.full else "and no other id"
        return f"root inside is this user (uid {uid}) outside, {extra}"

    def owns(self, uid: int, gid: int) -> bool:
        """Whether the host ids ``uid``/``gid`` are ids inside (mapped)."""
        return any(o <= uid < o + n for _, o, n in self.uids) and any(
            o <= gid < o + n for _, o, n in self.gids
        )


def _subordinate(path: str, names: tuple[str, ...]) -> tuple[int, int] | None:
    """The first range of at least `RANGE` - 1 ids ``path`` gives one of ``names``."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in names:
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count >= RANGE - 1:
            return start, count
    return None


def _names() -> tuple[str, ...]:
    uid = os.geteuid()
    try:
        return (pwd.getpwuid(uid).pw_name, str(uid))
    except KeyError:
        return (str(uid),)


@functools.lru_cache(maxsize=1)
def for_this_process() -> IdMap:
    """The maps this server gives its sandboxes (see the module's docstring)."""
    uid, gid = os.geteuid(), os.getegid()
    names = _names()
    sub_u, sub_g = _subordinate(SUBUID, names), _subordinate(SUBGID, names)
    if uid == 0:
        ubase = sub_u[0] if sub_u and sub_u[1] >= RANGE else FALLBACK_BASE
        gbase = sub_g[0] if sub_g and sub_g[1] >= RANGE else FALLBACK_BASE
        return IdMap(uids=((0, ubase, RANGE),), gids=((0, gbase, RANGE),))
    newuidmap, newgidmap = shutil.which("newuidmap"), shutil.which("newgidmap")
    if sub_u and sub_g and newuidmap and newgidmap:
        nu, ng = min(sub_u[1], RANGE - 1), min(sub_g[1], RANGE - 1)
        return IdMap(
            uids=((0, uid, 1), (1, sub_u[0], nu)),
            gids=((0, gid, 1), (1, sub_g[0], ng)),
            helpers=(newuidmap, newgidmap),
        )
    return IdMap(uids=((0, uid, 1),), gids=((0, gid, 1),))


def missing_range_help() -> str:
    """`FULL_RANGE_FIX` for this user."""
    return FULL_RANGE_FIX.format(user=_names()[0])


def own_tree(path: Path, idmap: IdMap) -> None:
    """Give what the server made under ``path`` (``path`` too) to the sandbox's ids.

    As root only (a normal user's files are already root's inside). An entry whose
    owner is not an id inside (the server wrote it as host root, or copied it) is
    shifted into the range: host id ``n`` < 65536 becomes inside id ``n`` (root's
    files become root's), any other becomes root. Entries that are already ids
    inside (a sandbox's own files in a snapshot or volume) are left as they are.
    Symlinks are changed, never followed.
    """
    if os.geteuid() != 0 or not os.path.lexists(path):
        return
    (ubase, gbase), span = idmap.root, idmap.uids[0][2]

    def moved(host_id: int, base: int) -> int:
        if base <= host_id < base + span:
            return host_id
        return base + (host_id if host_id < span else 0)

    def shift(full: str, st: os.stat_result) -> None:
        if not idmap.owns(st.st_uid, st.st_gid):
            os.lchown(full, moved(st.st_uid, ubase), moved(st.st_gid, gbase))

    shift(str(path), os.lstat(path))
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            full = os.path.join(dirpath, name)
            try:
                shift(full, os.lstat(full))
            except FileNotFoundError:
                continue


def mirror_dirs(host_dir: str, upper: Path, idmap: IdMap) -> None:
    """The directories of ``host_dir`` made in ``upper`` (a build sandbox's writable
    overlay over it), with their modes, owned by root inside.

    The host's own directories belong to host ids that are no ids inside, and the kernel
    lets no one inside a user namespace write into a directory whose owner it cannot map
    (not even its root). A merged directory takes its owner from the upper one, so with
    these dpkg may add and replace files anywhere there; the host's files are unchanged.
    `prune_mirrored` takes away what stayed empty."""
    root = idmap.root if os.geteuid() == 0 else None
    for dirpath, _dirnames, _files in os.walk(host_dir):  # links are not followed
        rel = os.path.relpath(dirpath, host_dir)
        target = upper if rel == "." else upper / rel
        with contextlib.suppress(FileExistsError):
            os.mkdir(target)
        os.chmod(target, stat.S_IMODE(os.lstat(dirpath).st_mode), follow_symlinks=False)
        if root is not None:
            os.lchown(target, *root)


def prune_mirrored(host_dir: str, upper: Path) -> None:
    """Remove the directories of ``upper`` that are empty and stand for one of
    ``host_dir`` (what `mirror_dirs` made and the build left alone); an opaque one (a
    directory the build replaced) stays."""
    for dirpath, _dirnames, _files in os.walk(upper, topdown=False):
        path = Path(dirpath)
        if path == upper or not os.path.isdir(os.path.join(host_dir, path.relative_to(upper))):
            continue
        with contextlib.suppress(OSError):
            if any("overlay.opaque" in a for a in os.listxattr(path, follow_symlinks=False)):
                continue
            os.rmdir(path)  # only if empty


_REMOVE_INSIDE = (
    "import json, shutil, sys, types\n"
    "c = types.ModuleType('container')\n"
    "exec(compile(open(sys.argv[1]).read(), '<prefect-modal-container>', 'exec'), c.__dict__)\n"
    "c._enter_userns(json.loads(sys.argv[2]))\n"
    "shutil.rmtree(sys.argv[3], ignore_errors=True)\n"
)


def remove_inside(path: Path) -> bool:
    """Remove ``path`` as root of a user namespace with this server's maps; True if gone.

    A normal user's sandboxes give files to the user's subordinate ids (dpkg does), which
    the user may not remove; root of a namespace that maps those ids may (``podman
    unshare``'s way). As root, or without a subordinate range, there is nothing to do."""
    idmap = for_this_process()
    if os.geteuid() == 0 or not idmap.helpers or not os.path.lexists(path):
        return not os.path.lexists(path)
    from . import container  # its text, run by a fresh interpreter (it forks)

    spec = json.dumps(idmap.spec())
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", _REMOVE_INSIDE, container.__file__, spec, str(path)],
        capture_output=True,
        timeout=600,
        check=False,
    )
    return not os.path.lexists(path)


__all__ = [
    "FALLBACK_BASE",
    "FULL_RANGE_FIX",
    "NO_USERNS_NOTICE",
    "RANGE",
    "IdMap",
    "for_this_process",
    "mirror_dirs",
    "missing_range_help",
    "own_tree",
    "prune_mirrored",
    "remove_inside",
]
