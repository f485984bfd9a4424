"""Volumes: named directories in the server's state directory, and the client's Volume API.

``Volume.batch_upload`` sends each file's 8 MiB blocks by SHA-256
(``VolumePutFiles2``); the server answers with the blocks it lacks and an
upload URL for each (`blobs.BlobStore`), and once it has every block it writes
the files into the volume's directory. ``read_file`` gets one download URL per
block. Paths are the volume's (``/a/b`` and ``a/b`` are the same file) and are
resolved by the kernel inside the volume's directory (`isolation.open_in_root`):
sandboxes write to volumes, and a symlink one made cannot point the server at a
host file.

Visibility: a volume is one live directory bound into every sandbox that
mounts it, so a write is seen by every other sandbox at once; ``commit`` and
``reload`` succeed and change nothing (on Modal, another running container
sees changes only after the writer's ``commit`` and its own ``reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import shutil
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import empty_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..runtime import layers
from ..runtime.isolation import FsRoot
from ..state import VolumeInfo
from .base import NAME_RE, Room, fail
from .filesystem import _makedirs, is_dir

#: Modal's volume block size: the client hashes and uploads files in blocks of this size
BLOCK_SIZE = 8 * 1024 * 1024
_LIST_BATCH = 100
_COPY_CHUNK = 1 << 20
FileType = api_pb2.FileEntry.FileType


def _norm(path: str) -> str:
    """A volume path as ``/a/b`` (``..`` cannot climb above the volume's root)."""
    return layers.abs_path(path.strip())


@contextlib.contextmanager
def _root(vol: VolumeInfo) -> Iterator[FsRoot]:
    root = FsRoot(os.open(vol.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), in_root=True)
    try:
        yield root
    finally:
        root.close()


def _entry(rel: str, st: os.stat_result) -> api_pb2.FileEntry:
    if stat_mod.S_ISLNK(st.st_mode):
        kind = FileType.SYMLINK
    elif stat_mod.S_ISDIR(st.st_mode):
        kind = FileType.DIRECTORY
    elif stat_mod.S_ISFIFO(st.st_mode):
        kind = FileType.FIFO
    elif stat_mod.S_ISSOCK(st.st_mode):
        kind = FileType.SOCKET
    else:
        kind = FileType.FILE
    return api_pb2.FileEntry(
        path=rel.lstrip("/"), type=kind, mtime=int(st.st_mtime), size=st.st_size
    )


def _list(vol: VolumeInfo, path: str, recursive: bool) -> list[api_pb2.FileEntry]:
    norm = _norm(path)
    out: list[api_pb2.FileEntry] = []
    with _root(vol) as root:
        with root.opened(norm, os.O_PATH | os.O_NOFOLLOW) as fd:
            st = os.stat(fd)
            if not stat_mod.S_ISDIR(st.st_mode):
                return [_entry(norm, st)]
        stack = [norm]
        while stack:
            here = stack.pop()
            with root.opened(here, os.O_RDONLY | os.O_DIRECTORY) as dfd:
                for name in sorted(os.listdir(dfd)):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    rel = posixpath.join(here, name)
                    out.append(_entry(rel, st))
                    if recursive and stat_mod.S_ISDIR(st.st_mode):
                        stack.append(rel)
    return out


def _write_file(root: FsRoot, path: str, blocks: list[Path], mode: int, no_overwrite: bool) -> None:
    parent, name = posixpath.split(path)
    _makedirs(root, parent)
    with root.opened(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
        if no_overwrite and os.path.lexists(f"/proc/self/fd/{pfd}/{name}"):
            raise FileExistsError(errno.EEXIST, "File exists", path)
        tmp = f".{name}.upload-{os.getpid()}-{id(blocks)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            with open(fd, "wb", closefd=True) as out:
                for block in blocks:
                    with open(block, "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
            os.chmod(tmp, (mode & 0o7777) or 0o644, dir_fd=pfd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise


def _copy(vol: VolumeInfo, srcs: list[str], dst: str, recursive: bool) -> None:
    with _root(vol) as root:
        dst_n = _norm(dst)
        into = len(srcs) > 1 or dst.endswith("/") or is_dir(root, dst_n)
        for src in srcs:
            src_n = _norm(src)
            target = posixpath.join(dst_n, posixpath.basename(src_n)) if into else dst_n
            if target == src_n:
                raise ValueError(f"cannot copy {src!r} onto itself")
            with root.opened(src_n, os.O_PATH | os.O_NOFOLLOW) as sfd:
                src_is_dir = stat_mod.S_ISDIR(os.stat(sfd).st_mode)
                if src_is_dir and not recursive:
                    raise IsADirectoryError(
                        errno.EISDIR, f"{src!r} is a directory: pass recursive=True", src
                    )
                parent, name = posixpath.split(target)
                _makedirs(root, parent)
                with root.opened(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
                    if src_is_dir:
                        if (target + "/").startswith(src_n.rstrip("/") + "/"):
                            raise ValueError(f"cannot copy {src!r} into itself ({dst!r})")
                        layers.copy_tree(f"/proc/self/fd/{sfd}", f"/proc/self/fd/{pfd}/{name}")
                    else:
                        with root.opened(src_n, os.O_RDONLY) as rfd:
                            mode = os.stat(rfd).st_mode
                            wfd = os.open(
                                name,
                                os.O_WRONLY
                                | os.O_CREAT
                                | os.O_TRUNC
                                | os.O_NOFOLLOW
                                | os.O_CLOEXEC,
                                stat_mod.S_IMODE(mode),
                                dir_fd=pfd,
                            )
                            with open(rfd, "rb", closefd=False) as r, open(wfd, "wb") as w:
                                shutil.copyfileobj(r, w, _COPY_CHUNK)


def _remove(vol: VolumeInfo, path: str, recursive: bool) -> None:
    norm = _norm(path)
    if norm == "/":
        raise PermissionError(errno.EPERM, "the root of a volume cannot be removed", path)
    parent, name = posixpath.split(norm)
    with _root(vol) as root, root.opened(parent, os.O_RDONLY | os.O_DIRECTORY) as pfd:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat_mod.S_ISDIR(st.st_mode):
            if not recursive:
                raise IsADirectoryError(
                    errno.EISDIR, f"{path!r} is a directory: pass recursive=True", path
                )
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)


def _file_size(vol: VolumeInfo, path: str) -> int:
    with _root(vol) as root, root.opened(_norm(path), os.O_RDONLY) as fd:
        st = os.fstat(fd)
        if stat_mod.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        return st.st_size


def _os_fail(exc: OSError, vol: VolumeInfo, path: str) -> None:
    where = f"{path!r} in volume {vol.name!r}"
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        fail(Status.NOT_FOUND, f"No such file or directory: {where}")
    if isinstance(exc, FileExistsError):
        fail(
            Status.ALREADY_EXISTS,
            f"{where} already exists; use batch_upload(force=True) to overwrite it",
        )
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        fail(Status.INVALID_ARGUMENT, f"{where}: {exc.strerror or exc}")
    fail(Status.FAILED_PRECONDITION, f"{where}: {exc.strerror or exc}")


class Volumes(Room):
    """Volumes: named directories in the server's state directory, and the Volume API."""

    def _volume(self, volume_id: str) -> VolumeInfo:
        vol = self.reg.volumes_by_id.get(volume_id)
        if vol is None:
            fail(Status.NOT_FOUND, f"Volume {volume_id!r} not found")
        return vol

    async def VolumeGetOrCreate(
        self, stream: Stream[api_pb2.VolumeGetOrCreateRequest, api_pb2.VolumeGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        name = req.deployment_name
        if not NAME_RE.match(name):
            fail(
                Status.INVALID_ARGUMENT,
                f"invalid volume name {name!r}: use letters, digits, '.', '_' or '-'",
            )
        ot = req.object_creation_type
        if (
            ot == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS
            and name in self.reg.volumes_by_name
        ):
            fail(Status.ALREADY_EXISTS, f"Volume {name!r} already exists")
        create = ot != api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED
        info = self.reg.volume_get_or_create(name, create)
        if info is None:
            fail(Status.NOT_FOUND, f"Volume {name!r} not found; use create_if_missing=True")
        version = req.version or api_pb2.VOLUME_FS_VERSION_V2
        md = api_pb2.VolumeMetadata(name=name, version=version)
        await stream.send_message(
            api_pb2.VolumeGetOrCreateResponse(volume_id=info.id, version=version, metadata=md)
        )

    async def VolumeGetById(
        self, stream: Stream[api_pb2.VolumeGetByIdRequest, api_pb2.VolumeGetByIdResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        md = api_pb2.VolumeMetadata(name=vol.name, version=api_pb2.VOLUME_FS_VERSION_V2)
        await stream.send_message(api_pb2.VolumeGetByIdResponse(volume_id=vol.id, metadata=md))

    async def VolumePutFiles2(
        self, stream: Stream[api_pb2.VolumePutFiles2Request, api_pb2.VolumePutFiles2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        blobs = self.ctx.blobs
        missing: list[api_pb2.VolumePutFiles2Response.MissingBlock] = []
        for fi, f in enumerate(req.files):
            if not f.path or _norm(f.path) == "/":
                fail(Status.INVALID_ARGUMENT, f"{f.path!r} is not a file path in a volume")
            for bi, block in enumerate(f.blocks):
                sha = block.contents_sha256.hex()
                if not blobs.has(sha):
                    url = await blobs.put_url(sha256_hex=sha)
                    missing.append(
                        api_pb2.VolumePutFiles2Response.MissingBlock(
                            file_index=fi, block_index=bi, put_url=url
                        )
                    )
        if missing:
            await stream.send_message(api_pb2.VolumePutFiles2Response(missing_blocks=missing))
            return

        def write_all() -> None:
            with _root(vol) as root:
                for f in req.files:
                    blocks = [blobs.path(b.contents_sha256.hex()) for b in f.blocks]
                    try:
                        _write_file(
                            root,
                            _norm(f.path),
                            blocks,
                            f.mode,
                            req.disallow_overwrite_existing_files,
                        )
                    except OSError as exc:
                        exc.filename = f.path
                        raise

        try:
            await asyncio.to_thread(write_all)
        except OSError as exc:
            _os_fail(exc, vol, str(exc.filename))
        await stream.send_message(api_pb2.VolumePutFiles2Response())

    async def VolumeListFiles2(
        self, stream: Stream[api_pb2.VolumeListFiles2Request, api_pb2.VolumeListFiles2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        try:
            entries = await asyncio.to_thread(_list, vol, req.path, req.recursive)
        except OSError as exc:
            _os_fail(exc, vol, req.path)
        if req.max_entries:
            entries = entries[: req.max_entries]
        for i in range(0, len(entries), _LIST_BATCH):
            await stream.send_message(
                api_pb2.VolumeListFiles2Response(entries=entries[i : i + _LIST_BATCH])
            )

    async def VolumeGetFile2(
        self, stream: Stream[api_pb2.VolumeGetFile2Request, api_pb2.VolumeGetFile2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        try:
            size = await asyncio.to_thread(_file_size, vol, req.path)
        except OSError as exc:
            _os_fail(exc, vol, req.path)
        start = min(req.start, size)
        end = size if not req.len else min(size, start + req.len)
        urls = []
        pos = start
        while pos < end:
            block_end = min(end, (pos // BLOCK_SIZE + 1) * BLOCK_SIZE)
            urls.append(
                await self.ctx.blobs.get_url(vol.path, _norm(req.path), pos, block_end - pos)
            )
            pos = block_end
        await stream.send_message(
            api_pb2.VolumeGetFile2Response(get_urls=urls, size=size, start=start, len=end - start)
        )

    async def VolumeRemoveFile2(
        self, stream: Stream[api_pb2.VolumeRemoveFile2Request, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        try:
            await asyncio.to_thread(_remove, vol, req.path, req.recursive)
        except OSError as exc:
            _os_fail(exc, vol, req.path)
        await stream.send_message(empty_pb2.Empty())

    async def VolumeCopyFiles2(
        self, stream: Stream[api_pb2.VolumeCopyFiles2Request, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        if not req.src_paths:
            fail(Status.INVALID_ARGUMENT, "copy_files: no source paths given")
        try:
            await asyncio.to_thread(_copy, vol, list(req.src_paths), req.dst_path, req.recursive)
        except ValueError as exc:
            fail(Status.INVALID_ARGUMENT, f"copy_files in volume {vol.name!r}: {exc}")
        except OSError as exc:
            _os_fail(exc, vol, str(exc.filename or req.dst_path))
        await stream.send_message(empty_pb2.Empty())

    async def VolumeCommit(
        self, stream: Stream[api_pb2.VolumeCommitRequest, api_pb2.VolumeCommitResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        self._volume(req.volume_id)
        # a local volume is one live directory: every write is already visible everywhere
        await stream.send_message(api_pb2.VolumeCommitResponse(skip_reload=True))

    async def VolumeReload(
        self, stream: Stream[api_pb2.VolumeReloadRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        self._volume(req.volume_id)
        await stream.send_message(empty_pb2.Empty())
