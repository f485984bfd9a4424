"""Files the server reads and writes inside trees a sandbox can change, by descriptor only.

A sandbox's root and a volume's directory are written by the sandbox while
the server works in them (the file API, ``modal volume put/get/cp``,
snapshots). Whatever the sandbox puts there is hostile to the server: a
symlink to ``/dev/zero`` (a read that never ends), a FIFO (an ``open`` that
blocks a thread of the server's pool for good), a temporary name swapped for
a symlink to a host file between two calls by name (a ``chmod`` of the host
file). So, like bubblewrap's ``bind-mount.c`` does for its mounts, every step
here goes by file descriptor, and one narrow interface serves every caller:

* `open_regular` - an existing *regular* file, open for reading or writing.
  The path is resolved by the kernel inside the root (`FsRoot`: a symlink is
  followed, but never out of the root) to an ``O_PATH`` descriptor, which
  opens nothing: a FIFO does not block, a device's driver is never called.
  Only if ``fstat`` says regular file is that same inode reopened for I/O
  (through ``/proc/self/fd``, ``O_NONBLOCK | O_NOCTTY``), whatever the sandbox
  renames meanwhile. Anything else is refused (`NotRegularFile`).
* `create_regular` / `place` - new files made with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` relative to a directory descriptor, filled and ``fchmod``-ed by
  their descriptor, and moved into place with ``renameat`` / ``linkat``
  relative to that directory: if a sandbox swaps the temporary name for a
  symlink, the server moves the sandbox's symlink inside the sandbox's own
  tree, and no host file is ever opened, changed or chmod-ed by name.
* `copy_fd` / `read_chunks` - copies in the kernel and reads in bounded pieces:
  no whole file is ever held in the server's memory.
* `Spool` - bytes that arrive in pieces (a file-API write's stdin), in memory
  up to `SPOOL_MEMORY_BYTES`, beyond that in an unnamed file of the server's
  own state directory.

What is not a regular file has no content the server serves: devices, FIFOs
and sockets are refused (Modal's ``modal-sandbox-fs-tools`` reads and writes
files; the local server refuses rather than guess what a device would give).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # `layers` uses this module, and `isolation` uses `layers`
    from .isolation import FsRoot

#: Bytes one read or copy step moves (the most the server holds of a file at once).
CHUNK_BYTES = 1 << 20
#: A spooled stdin stays in memory up to this size, then moves to a file.
SPOOL_MEMORY_BYTES = 1 << 20

_KIND_NAMES = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


class NotRegularFile(OSError):
    """The path names a FIFO, a device or a socket: the server neither reads nor writes it."""

    def __init__(self, path: str, mode: int) -> None:
        kind = _KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")
        super().__init__(errno.EINVAL, f"Not a regular file ({kind})", path)
        self.kind = kind


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in a few words (for messages)."""
    return _KIND_NAMES.get(stat.S_IFMT(mode), "a regular file")


def _check_regular(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, st.st_mode)
    return st


def _reopen(path_fd: int, flags: int) -> int:
    """The inode behind an ``O_PATH`` descriptor, opened for I/O (never by its name)."""
    return os.open(f"/proc/self/fd/{path_fd}", flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


def open_regular(root: FsRoot, path: str, *, write: bool = False) -> tuple[int, os.stat_result]:
    """An existing regular file ``path`` inside ``root``: a descriptor open for reading
    (or, with ``write``, for writing, not truncated) and its ``fstat``. Raises
    `NotRegularFile`, `IsADirectoryError` or the open's own `OSError`."""
    path_fd = root.open(path, os.O_PATH)
    try:
        _check_regular(path_fd, path)
        fd = _reopen(path_fd, os.O_WRONLY if write else os.O_RDONLY)
    finally:
        os.close(path_fd)
    try:
        return fd, _check_regular(fd, path)  # the same inode; checked again all the same
    except BaseException:
        os.close(fd)
        raise


def open_regular_at(dir_fd: int, name: str, path: str) -> tuple[int, os.stat_result]:
    """``name`` in the directory ``dir_fd`` (never through a symlink) open for reading,
    if it is a regular file (`open_regular` for a walk that holds the directory)."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        _check_regular(path_fd, path)
        fd = _reopen(path_fd, os.O_RDONLY)
    finally:
        os.close(path_fd)
    try:
        return fd, _check_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise


def create_regular(dir_fd: int, name: str, mode: int = 0o600) -> int:
    """A new file ``name`` in ``dir_fd``, open for writing; ``FileExistsError`` if anything,
    a symlink included, is there already (``O_EXCL`` never follows one)."""
    return os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )


def place(
    dir_fd: int, name: str, fill: Callable[[int], object], mode: int, *, replace: bool = True
) -> None:
    """Make ``name`` in ``dir_fd`` a new regular file: ``fill(fd)`` writes it under a
    temporary name, its mode is set with ``fchmod``, and it is renamed over ``name``
    (``replace``) or linked to it (else: ``FileExistsError`` if ``name`` exists, decided
    by the kernel at that moment). Every step is relative to ``dir_fd`` and none
    follows a symlink."""
    tmp = f".upload-{secrets.token_hex(8)}"  # short: any name fits beside it
    fd = create_regular(dir_fd, tmp)
    try:
        try:
            fill(fd)
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            _link_once_more(tmp, name, dir_fd)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _link_once_more(tmp: str, name: str, dir_fd: int) -> None:
    """``linkat`` of what is at ``tmp`` (never following a symlink) to ``name``. A sandbox
    that renamed something over ``tmp`` after the kernel looked it up makes the link fail
    with ENOENT (the looked-up inode has no name left): then what is there now is linked,
    as a rename would have moved it."""
    for attempt in range(3):
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def copy_fd(src: int, dst: int, limit: int | None = None) -> int:
    """Copy from ``src``'s position to EOF (at most ``limit`` bytes) into ``dst``, in the
    kernel (``copy_file_range``, else ``sendfile``); returns the bytes copied."""
    total = 0
    use_range = hasattr(os, "copy_file_range")
    while limit is None or total < limit:
        want = CHUNK_BYTES * 64 if limit is None else min(CHUNK_BYTES * 64, limit - total)
        if use_range:
            try:
                moved = os.copy_file_range(src, dst, want)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_range = False
                continue
        else:
            moved = os.sendfile(dst, src, None, want)
        if moved == 0:
            break
        total += moved
    return total


def read_chunks(fd: int, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``fd``'s content from its position, ``chunk`` bytes at a time."""
    while data := os.read(fd, chunk):
        yield data


def open_up_tree(path: Path, mode: int = stat.S_IRWXU) -> None:
    """Give ``path`` and every directory below it ``mode`` (so a tree a sandbox made
    unwritable can be removed), walking by descriptor: each directory is opened with
    ``O_NOFOLLOW`` and changed through its own descriptor, so a directory swapped for
    a symlink meanwhile leads nowhere outside the tree."""
    top = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _open_up(top, mode)
    finally:
        os.close(top)


def _open_up(path_fd: int, mode: int) -> None:
    if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
        return
    os.chmod(f"/proc/self/fd/{path_fd}", mode)  # the directory itself: no name is followed
    dfd = _reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(dfd) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                sub = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                _open_up(sub, mode)
            except OSError:
                pass
            finally:
                os.close(sub)
    finally:
        os.close(dfd)


class Spool:
    """Bytes that arrive in pieces, in memory up to `SPOOL_MEMORY_BYTES`, then in an
    unnamed temporary file (``O_TMPFILE`` where the file system has it) in
    ``directory``, the server's own (never a sandbox's tree). Has ``extend`` like the
    ``bytearray`` it replaces."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is None and len(self._memory) + len(data) <= SPOOL_MEMORY_BYTES:
            self._memory.extend(data)
            return
        if self._file is None:
            if self._directory is not None:
                self._directory.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=self._directory)
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(data)

    def write_into(self, fd: int) -> int:
        """Write everything spooled into ``fd``; returns the bytes written."""
        if self._file is None:
            view = memoryview(self._memory)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                view.release()
            return len(self._memory)
        self._file.flush()
        self._file.seek(0)
        return copy_fd(self._file.fileno(), fd)

    def close(self) -> None:
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = [
    "CHUNK_BYTES",
    "NotRegularFile",
    "Spool",
    "copy_fd",
    "create_regular",
    "kind_of",
    "open_regular",
    "open_regular_at",
    "open_up_tree",
    "place",
    "read_chunks",
]
