"""A sandbox's private view of a v1 Volume, merged into the volume when the sandbox ends.

On Modal a VolumeFS v1 volume (the version an unversioned volume gets,
``modal/volume.py:_validate_volume_version``) receives a sandbox's writes when
the sandbox terminates: "files are only synced back to the Volume when the
Sandbox terminates" (Modal's guide, Sandbox files). Until then the Volume API
and other sandboxes see the volume as it was. v2 volumes are live, and the
local server binds them directly.

So a v1 mount gets a copy of the volume taken at create (`make_view`), bound
where the volume would be; when the sandbox ends (exited, terminated, timed
out) what it changed there is applied to the volume (`merge_view`): files it
added or changed are written, files it removed are removed, last writer wins
per file, as with Modal's commits. The copy costs time and disk in proportion
to the volume, so a large volume read by many sandboxes is better made v2.

The view is the sandbox's: what it leaves there is hostile. Both copies go by
descriptor (`layers.copy_tree` and `safe_files`): directories are opened with
``O_NOFOLLOW`` one component at a time, symlinks are copied as symlinks and
never followed, regular files are written under a temporary name and renamed
into place relative to their directory's descriptor, and FIFOs, devices and
sockets are left out (a device node read would never end).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import layers, safe_files

#: relative path -> (mode, size, mtime_ns) of each entry of the view at create
Manifest = dict[str, tuple[int, int, int]]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class VolumeView:
    """One v1 mount: the volume's directory, the sandbox's copy, the copy's start state."""

    volume: Path
    view: Path
    manifest: Manifest = field(default_factory=dict)


def _scan(root: Path) -> Manifest:
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):  # never into a symlinked directory
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            found[rel] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def make_view(volume: Path, view: Path) -> VolumeView:
    """Copy ``volume`` to ``view`` (symlinks as links; no FIFO or device) and note what
    the copy holds."""
    volume.mkdir(parents=True, exist_ok=True)
    view.parent.mkdir(parents=True, exist_ok=True)
    if view.exists():
        raise FileExistsError(f"{view} exists")
    layers.copy_tree(volume, view)
    return VolumeView(volume=volume, view=view, manifest=_scan(view))


@contextlib.contextmanager
def _dir_at(top_fd: int, rel: str) -> Iterator[int | None]:
    """The directory ``rel`` below ``top_fd``, each component opened with ``O_NOFOLLOW``
    (None if one is missing, a symlink or not a directory)."""
    fd = os.dup(top_fd)
    try:
        for part in [p for p in rel.split("/") if p and p != "."]:
            try:
                sub = os.open(part, _DIR, dir_fd=fd)
            except OSError:
                yield None
                return
            os.close(fd)
            fd = sub
        yield fd
    finally:
        os.close(fd)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: str) -> None:
    st = _lstat(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _copy_file(src_dir: int, dst_dir: int, name: str, rel: str) -> None:
    """A regular file of the view into the volume (`safe_files.place`); anything else
    there now (a FIFO, a device) is left out."""
    try:
        src, st = safe_files.open_regular_at(src_dir, name, rel)
    except OSError:
        return

    def fill(fd: int) -> None:
        safe_files.copy_fd(src, fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    try:
        old = _lstat(dst_dir, name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            shutil.rmtree(name, dir_fd=dst_dir)
        safe_files.place(dst_dir, name, fill, stat.S_IMODE(st.st_mode))
    finally:
        os.close(src)


def merge_view(v: VolumeView) -> None:
    """Apply what the sandbox changed in its view to the volume (blocking file I/O)."""
    if not v.view.is_dir():
        return
    now = _scan(v.view)
    vol_fd = os.open(v.volume, _DIR)
    view_fd = os.open(v.view, _DIR)
    try:
        for rel in sorted(set(v.manifest) - set(now), key=len, reverse=True):  # removed
            parent, name = posixpath.split(rel)
            with _dir_at(vol_fd, parent) as pfd:
                if pfd is not None:
                    _remove(pfd, name)
        for rel in sorted(now, key=len):  # added or changed, parents first
            mode, _size, _mtime = now[rel]
            if v.manifest.get(rel) == now[rel] and not stat.S_ISDIR(mode):
                continue
            parent, name = posixpath.split(rel)
            with _dir_at(vol_fd, parent) as pfd, _dir_at(view_fd, parent) as sfd:
                if pfd is None or sfd is None:
                    continue
                if stat.S_ISDIR(mode):
                    there = _lstat(pfd, name)
                    if there is not None and not stat.S_ISDIR(there.st_mode):
                        os.unlink(name, dir_fd=pfd)
                        there = None
                    if there is None:
                        os.mkdir(name, 0o777, dir_fd=pfd)  # as before: umask's mode
                elif stat.S_ISLNK(mode):
                    target = os.readlink(name, dir_fd=sfd)
                    _remove(pfd, name)
                    os.symlink(target, name, dir_fd=pfd)
                elif stat.S_ISREG(mode):
                    _copy_file(sfd, pfd, name, rel)
                # FIFOs, devices and sockets: not content a volume keeps
    finally:
        os.close(vol_fd)
        os.close(view_fd)
