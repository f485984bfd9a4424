"""File layers: what snapshots and local files add to a sandbox's root.

A layer is a directory tree under the state directory (``<state>/images/<id>/layer``,
``<state>/mounts/<id>/tree``) laid out as the sandbox sees it. A sandbox made
from an image with layers starts with a *copy* of them in its writable root
(never hard links: the sandbox may change its files in place, and a hard link
would change the layer, and so every later sandbox made from it).

What a layer holds under the image's read-only directories (``/usr``,
``/etc``: the host's, standing in for the image) is not copied: it is shown
over them by a read-only overlay (`overlays`).

Copies keep modes, times and symlinks (never followed); devices, FIFOs and
sockets are left out (a root has none worth keeping: /dev is made fresh),
except overlayfs whiteouts (0/0 character devices an ``apt_install`` layer has
under ``/usr`` or ``/etc`` for what its install removed), copied as whiteouts.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from . import safe_files


def abs_path(path: str) -> str:
    """``path`` as a normal absolute path (``a/../b`` -> ``/b``, ``//x`` -> ``/x``)."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SENDFILE_CHUNK = 1 << 30


def copy_tree(src: str | Path, dst: str | Path, skip: Iterable[str] = ()) -> int:
    """Copy ``src`` over ``dst`` (merging into what is there; a file replaces a
    file or symlink). ``skip`` are paths relative to ``src`` (``usr``,
    ``work/project/.venv``) not copied. Returns the number of files copied.

    Below ``src`` and ``dst`` themselves every step goes by file descriptor
    with ``O_NOFOLLOW``: a sandbox that swaps a directory for a symlink while
    its files are copied (a snapshot, a volume's ``copy_files``) cannot make
    this read or write anything outside the two trees."""
    skipped = {posixpath.normpath(s.strip("/")) for s in skip if s.strip("/")}
    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent_fd = os.open(os.path.dirname(dst), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _copy_dir(src_fd, parent_fd, os.path.basename(dst), "", skipped)
        finally:
            os.close(parent_fd)
    finally:
        os.close(src_fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _copy_dir(src_fd: int, parent_fd: int, name: str, rel: str, skipped: set[str]) -> int:
    st = os.fstat(src_fd)
    there = _lstat_at(parent_fd, name)
    made = there is None or not stat.S_ISDIR(there.st_mode)
    if made:
        if there is not None:
            _remove_at(parent_fd, name, there)
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    dfd = os.open(name, _DIR, dir_fd=parent_fd)
    count = 0
    try:
        with os.scandir(src_fd) as it:
            entries = list(it)
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            if sub in skipped:
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                cfd = os.open(entry.name, _DIR, dir_fd=src_fd)
                try:
                    count += _copy_dir(cfd, dfd, entry.name, sub, skipped)
                finally:
                    os.close(cfd)
            elif stat.S_ISLNK(mode):
                link = os.readlink(entry.name, dir_fd=src_fd)
                old = _lstat_at(dfd, entry.name)
                if old is not None:
                    _remove_at(dfd, entry.name, old)
                os.symlink(link, entry.name, dir_fd=dfd)
            elif stat.S_ISREG(mode):
                count += _copy_file(src_fd, dfd, entry.name)
            elif stat.S_ISCHR(mode) and entry.stat(follow_symlinks=False).st_rdev == 0:
                _copy_whiteout(dfd, entry.name)
    finally:
        if made:  # a directory already there keeps its mode (/root stays 0700)
            os.chmod(dfd, stat.S_IMODE(st.st_mode))
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.close(dfd)
    return count


def _copy_whiteout(dst_dir: int, name: str) -> None:
    """An overlayfs whiteout (a 0/0 character device: an ``apt_install``'s
    install removed the file below it) copied as one, replacing what ``dst`` has
    there, so the copy, used as an overlay's lower layer, still hides the file."""
    old = _lstat_at(dst_dir, name)
    if old is not None:
        _remove_at(dst_dir, name, old)
    try:
        os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dst_dir)
    except PermissionError:  # not root: what was there is removed, at least
        pass


def _copy_file(src_dir: int, dst_dir: int, name: str) -> int:
    try:  # a regular file only, never opened if it is not (a FIFO swapped in would block)
        rfd, st = safe_files.open_regular_at(src_dir, name, name)
    except OSError:  # gone, or swapped for a symlink, a FIFO or a device, since it was listed
        return 0
    try:
        old = _lstat_at(dst_dir, name)
        if old is not None:
            _remove_at(dst_dir, name, old)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        wfd = os.open(name, flags, 0o600, dir_fd=dst_dir)
        try:
            offset = 0
            while offset < st.st_size:  # what it held when opened: it may still grow
                sent = os.sendfile(wfd, rfd, offset, min(_SENDFILE_CHUNK, st.st_size - offset))
                if sent == 0:
                    break
                offset += sent
            os.chmod(wfd, stat.S_IMODE(st.st_mode))
            os.utime(wfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(wfd)
        return 1
    finally:
        os.close(rfd)


def clear_way(root: Path, paths: Iterable[str]) -> list[str]:
    """Make sure no component of each container path under ``root`` is a symlink.

    The container's mount points are made by host paths under the root (see
    `container.build_root`): a symlink a snapshot carries there (``/mnt ->
    /etc``) would be followed on the host. Such symlinks are removed (the mount
    takes their place); returns the container paths of those removed."""
    removed: list[str] = []
    for path in paths:
        here = str(root)
        for part in [p for p in abs_path(path).split("/") if p]:
            here = os.path.join(here, part)
            if os.path.islink(here):
                os.unlink(here)
                removed.append("/" + os.path.relpath(here, root))
            if not os.path.lexists(here):
                break  # made later, by the container, as a real directory
    return removed


def bind_roots(tree: Path, shared: Iterable[str]) -> list[str]:
    """Where a mount's tree can be bound read-only as a whole: its top-most
    entries that are not one of the ``shared`` directories (``/``, ``/root``,
    ``/opt``, the way to the image's directories), which the sandbox's own root
    must keep; below a shared directory each entry is a root of its own."""
    keep = {abs_path(p) for p in shared} | {"/"}
    roots: list[str] = []
    stack = ["/"]
    while stack:
        here = stack.pop()
        with os.scandir(tree / here.lstrip("/")) as it:
            for entry in it:
                path = posixpath.join(here, entry.name)
                if path in keep and entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                else:
                    roots.append(path)
    return sorted(roots)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def materialize(files: Iterable[tuple[str, Path, int]], tree: Path) -> None:
    """Lay out files (absolute remote path, content file, mode) as a tree under ``tree``."""
    tree.mkdir(parents=True, exist_ok=True)
    for remote, content, mode in files:
        rel = abs_path(remote).lstrip("/")
        if not rel:
            continue
        target = tree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(content, target)
        os.chmod(target, (mode & 0o7777) or 0o644)


def overlays(trees: Iterable[Path], readonly_dirs: Iterable[str]) -> dict[str, list[str]]:
    """Which of the image's read-only directories (``/usr``, ``/etc``) the layers
    add files to: container path -> the layers' directories there, top-most
    (the last layer) first.

    Those directories are the host's, bound read-only over the sandbox's root,
    so a layer's ``/usr/bin/jq`` copied into the root would be hidden. They are
    mounted as a read-only overlay instead (the layers' directories over the
    host's, see `container.build_root`): nothing is copied, and the layer's
    files can no more be changed by the sandbox than the host's."""
    found: dict[str, list[str]] = {}
    trees = list(trees)
    for d in readonly_dirs:
        rel = abs_path(d).lstrip("/")
        lowers = [
            str(tree / rel)
            for tree in reversed(trees)
            if not os.path.islink(tree / rel) and os.path.isdir(tree / rel)
        ]
        if lowers:
            found[abs_path(d)] = lowers
    return found


def overlay_workdir(upper: Path) -> Path:
    """The overlay work directory of a writable overlay's ``upper`` directory
    (beside it: on the same filesystem, not inside it)."""
    return upper.with_name(upper.name + ".overlay-work")


def relative_skips(paths: Iterable[str]) -> list[str]:
    """Container paths (``/usr``, ``/proc``) as `copy_tree` skips."""
    return [p.strip("/") for p in paths if p.strip("/")]


__all__ = [
    "abs_path",
    "bind_roots",
    "clear_way",
    "copy_tree",
    "materialize",
    "overlay_workdir",
    "overlays",
    "relative_skips",
    "under",
]
