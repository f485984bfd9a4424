"""File layers: what snapshots and local files add to a sandbox's root.

A layer is a directory tree under the state directory (``<state>/images/<id>/layer``,
``<state>/mounts/<id>/tree``) laid out as the sandbox sees it. A sandbox made
from an image with layers starts with a *copy* of them in its writable root
(never hard links: the sandbox may change its files in place, and a hard link
would change the layer, and so every later sandbox made from it).

Copies keep modes, times and symlinks (never followed); devices, FIFOs and
sockets are left out (a root has none worth keeping: /dev is made fresh).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path


def abs_path(path: str) -> str:
    """``path`` as a normal absolute path (``a/../b`` -> ``/b``, ``//x`` -> ``/x``)."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def copy_tree(src: str | Path, dst: str | Path, skip: Iterable[str] = ()) -> int:
    """Copy ``src`` over ``dst`` (merging into what is there; a file replaces a
    file or symlink). ``skip`` are paths relative to ``src`` (``usr``,
    ``work/project/.venv``) not copied. Returns the number of files copied."""
    skipped = {posixpath.normpath(s.strip("/")) for s in skip if s.strip("/")}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    return _copy_dir(str(src), str(dst), "", skipped)


def _copy_dir(src: str, dst: str, rel: str, skipped: set[str]) -> int:
    st = os.lstat(src)
    made = not os.path.isdir(dst) or os.path.islink(dst)
    if made:
        if os.path.lexists(dst):
            _remove(dst)
        os.mkdir(dst)
    count = 0
    with os.scandir(src) as it:
        entries = list(it)
    for entry in entries:
        sub = f"{rel}/{entry.name}" if rel else entry.name
        if sub in skipped:
            continue
        target = os.path.join(dst, entry.name)
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            count += _copy_dir(entry.path, target, sub, skipped)
        elif stat.S_ISLNK(mode):
            if os.path.lexists(target):
                _remove(target)
            os.symlink(os.readlink(entry.path), target)
        elif stat.S_ISREG(mode):
            if os.path.lexists(target) and (os.path.isdir(target) or os.path.islink(target)):
                _remove(target)
            shutil.copy2(entry.path, target, follow_symlinks=False)
            count += 1
    if made:  # a directory already there keeps its mode (/root stays 0700)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return count


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


def relative_skips(paths: Iterable[str]) -> list[str]:
    """Container paths (``/usr``, ``/proc``) as `copy_tree` skips."""
    return [p.strip("/") for p in paths if p.strip("/")]


__all__ = ["abs_path", "clear_way", "copy_tree", "materialize", "relative_skips"]
