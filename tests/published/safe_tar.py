"""Extracting a downloaded archive without letting it write outside its folder.

``TarFile.extractall(filter="data")`` does that, but only from Python 3.11.4
(and 3.10.12) on; the suite runs on any 3.11, Debian bookworm's 3.11.2
included. So the checks that matter here are made first, on every version:
no absolute name, no ``..``, no link leading out of the folder, no device or
FIFO; then the ``data`` filter is applied too where it exists.
"""

from __future__ import annotations

import copy
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path


class UnsafeArchiveError(Exception):
    """A member would land (or point) outside the folder, or is not a plain file."""


def _inside(root: Path, path: str | Path) -> bool:
    """Whether `path` (resolved, following links already on disk) is `root` or under it."""
    return Path(os.path.realpath(path)).is_relative_to(root)


def checked_member(member: tarfile.TarInfo, dest: Path) -> tarfile.TarInfo:
    """`member` if it is safe to extract into `dest` (a copy without setuid, setgid or
    sticky bits, as the ``data`` filter leaves them); else UnsafeArchiveError."""
    root = Path(os.path.realpath(dest))
    name = member.name
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise UnsafeArchiveError(f"{name!r}: an absolute path or one with '..'")
    if not _inside(root, root / name):
        raise UnsafeArchiveError(f"{name!r} would be written outside {dest}")
    if member.issym():
        target = member.linkname
        if os.path.isabs(target) or not _inside(root, root / Path(name).parent / target):
            raise UnsafeArchiveError(f"{name!r} links outside {dest} (to {target!r})")
    elif member.islnk():
        if os.path.isabs(member.linkname) or not _inside(root, root / member.linkname):
            raise UnsafeArchiveError(f"{name!r} links outside {dest} (to {member.linkname!r})")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{name!r} is a device or FIFO, not a file")
    safe = copy.copy(member)
    safe.mode = member.mode & 0o777
    return safe


def safe_extract(archive: tarfile.TarFile, dest: Path, members: Iterable[tarfile.TarInfo]) -> None:
    """Extract `members` of `archive` into `dest`, refusing (before writing anything)
    any that is unsafe (`checked_member`)."""
    dest.mkdir(parents=True, exist_ok=True)
    checked = [checked_member(m, dest) for m in members]
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: its checks too
        archive.extractall(dest, members=checked, filter="data")
    else:
        archive.extractall(dest, members=checked)
