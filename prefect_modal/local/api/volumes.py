"""Volumes: named directories in the server's state directory, and the client's Volume API.

``Volume.batch_upload`` sends each file's 8 MiB blocks by SHA-256
(``VolumePutFiles2``); the server answers with the blocks it lacks and an
upload URL for each (`blobs.BlobStore`), and once it has every block it writes
the files into the volume's directory. The client leaves a block's trailing
zero bytes out of its hash and its upload, and sends the file's size: the
server puts the zeros back (each block is ``BLOCK_SIZE`` long but the last,
which ends at the size). ``read_file`` gets one download URL per
block. Paths are the volume's (``/a/b`` and ``a/b`` are the same file) and are
resolved by the kernel inside the volume's directory (`isolation.open_in_root`):
sandboxes write to volumes, and a symlink one made cannot point the server at a
host file. Files are read and written by descriptor, regular files only
(`safe_files`): a FIFO or a device is refused, never opened, and an upload is
written under a temporary name, ``fchmod``-ed and renamed by descriptor, so a
sandbox that swaps the temporary file for a symlink cannot make the server
change a host file.

VolumeFS v1 volumes (``version=1``) get the v1 RPCs: each file is sent whole
(``MountPutFile``), then named (``VolumePutFiles``). ``Volume.ephemeral()`` makes a
nameless volume the server forgets `EPHEMERAL_TIMEOUT_S` after its client's last
heartbeat (unless a running sandbox mounts it), and with the server.
``Volume.objects.delete`` refuses while a running sandbox mounts the volume.

Visibility: a volume is one live directory bound into every sandbox that
mounts it, so a write is seen by every other sandbox at once; ``commit`` and
``reload`` succeed and change nothing (on Modal, another running container
sees changes only after the writer's ``commit`` and its own ``reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import posixpath
import shutil
import stat as stat_mod
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from google.protobuf import empty_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..retention import remove_tree
from ..runtime import layers, safe_files
from ..runtime.isolation import FsRoot
from ..state import VolumeInfo
from .base import CREATED_BY, NAME_RE, Room, fail, page_of
from .filesystem import _makedirs, is_dir

#: Modal's volume block size: the client hashes and uploads files in blocks of this size
BLOCK_SIZE = 8 * 1024 * 1024
_LIST_BATCH = 100
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
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:  # a sandbox removed it since: not listed
                        continue
                    rel = posixpath.join(here, name)
                    out.append(_entry(rel, st))
                    if recursive and stat_mod.S_ISDIR(st.st_mode):
                        stack.append(rel)
    return out


class _Upload(NamedTuple):
    """A file to write into a volume: its path, its content blocks in order, its mode and,
    for blocks whose trailing zeros were left out (VolumeFS v2), the file's size."""

    path: str
    blocks: list[Path]
    mode: int
    size: int | None = None


def _check_blocks(f: api_pb2.VolumePutFiles2Request.File, blocks: list[Path]) -> None:
    """Refuse a file whose blocks cannot make its size (the client's blocks are
    ``BLOCK_SIZE`` apart; each holds at most that many bytes, the last at most the rest)."""
    want = -(f.size // -BLOCK_SIZE)
    if len(blocks) != want:
        fail(
            Status.INVALID_ARGUMENT,
            f"{f.path!r}: {len(blocks)} blocks for a size of {f.size} bytes "
            f"(expected {want} blocks of {BLOCK_SIZE} bytes)",
        )
    for i, block in enumerate(blocks):
        room = min(BLOCK_SIZE, f.size - i * BLOCK_SIZE)
        held = block.stat().st_size
        if held > room:
            fail(
                Status.INVALID_ARGUMENT,
                f"{f.path!r}: block {i} holds {held} bytes, "
                f"more than the {room} its place in a file of {f.size} bytes has",
            )


def _write_file(root: FsRoot, up: _Upload, no_overwrite: bool) -> None:
    """One uploaded file into the volume, by descriptor (`safe_files.place`): a sandbox
    that mounts the volume and swaps the temporary file for a symlink to a host file
    makes the server rename its symlink inside the volume, never chmod or write the
    host file."""
    path, blocks = _norm(up.path), up.blocks
    parent, name = posixpath.split(path)
    _makedirs(root, parent)

    def fill(fd: int) -> None:
        for i, block in enumerate(blocks):
            if up.size is not None:
                os.lseek(fd, i * BLOCK_SIZE, os.SEEK_SET)  # the zeros left out of the block before
            src = os.open(block, os.O_RDONLY | os.O_CLOEXEC)  # the server's own blob store
            try:
                safe_files.copy_fd(src, fd)
            finally:
                os.close(src)
        if up.size is not None:
            os.ftruncate(fd, up.size)  # and those left out of the last block

    with root.opened(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
        safe_files.place(pfd, name, fill, (up.mode & 0o7777) or 0o644, replace=not no_overwrite)


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
                        rfd, st = safe_files.open_regular(root, src_n)
                        try:
                            safe_files.place(
                                pfd,
                                name,
                                functools.partial(safe_files.copy_fd, rfd),
                                stat_mod.S_IMODE(st.st_mode),
                            )
                        finally:
                            os.close(rfd)


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
    """The size of a regular file of the volume (a FIFO or a device is refused, never
    opened: `safe_files.open_regular`)."""
    with _root(vol) as root:
        fd, st = safe_files.open_regular(root, _norm(path))
        os.close(fd)
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
    if isinstance(exc, safe_files.NotRegularFile):
        fail(Status.INVALID_ARGUMENT, f"{where} is not a regular file ({exc.kind})")
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        fail(Status.INVALID_ARGUMENT, f"{where}: {exc.strerror or exc}")
    fail(Status.FAILED_PRECONDITION, f"{where}: {exc.strerror or exc}")


#: An ephemeral volume is forgotten this long after its client's last heartbeat
#: (the client sends one every 300 s while its ``with Volume.ephemeral()`` is open).
EPHEMERAL_TIMEOUT_S = 900.0


def _version(vol: VolumeInfo) -> api_pb2.VolumeFsVersion.ValueType:
    return api_pb2.VolumeFsVersion.ValueType(vol.version)


def _created_at(vol: VolumeInfo) -> float:
    return vol.created_at


def _metadata(vol: VolumeInfo) -> api_pb2.VolumeMetadata:
    # creation_info: `modal volume list` shows it, and the client pages by its created_at
    return api_pb2.VolumeMetadata(
        name=vol.name,
        version=_version(vol),
        creation_info=api_pb2.CreationInfo(created_at=vol.created_at, created_by=CREATED_BY),
    )


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
        self._sweep_ephemeral()
        ot = req.object_creation_type
        if req.version not in (
            api_pb2.VOLUME_FS_VERSION_UNSPECIFIED,
            api_pb2.VOLUME_FS_VERSION_V1,
            api_pb2.VOLUME_FS_VERSION_V2,
        ):
            fail(Status.INVALID_ARGUMENT, f"Volume version {req.version!r}: expected 1 or 2")
        # an unversioned volume is v1, as on Modal (the client normalises an unset version
        # to v1: modal/volume.py, _validate_volume_version)
        version = req.version or api_pb2.VOLUME_FS_VERSION_V1
        if ot == api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL:
            info = self.reg.ephemeral_volume(version)
        else:
            name = req.deployment_name
            if not NAME_RE.match(name):
                fail(
                    Status.INVALID_ARGUMENT,
                    f"invalid volume name {name!r}: use letters, digits, '.', '_' or '-'",
                )
            if (
                ot == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS
                and name in self.reg.volumes_by_name
            ):
                fail(Status.ALREADY_EXISTS, f"Volume {name!r} already exists")
            create = ot != api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED
            found = self.reg.volume_get_or_create(name, create, version)
            if found is None:
                fail(Status.NOT_FOUND, f"Volume {name!r} not found; use create_if_missing=True")
            info = found
        await stream.send_message(
            api_pb2.VolumeGetOrCreateResponse(
                volume_id=info.id, version=_version(info), metadata=_metadata(info)
            )
        )

    async def VolumeGetById(
        self, stream: Stream[api_pb2.VolumeGetByIdRequest, api_pb2.VolumeGetByIdResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        await stream.send_message(
            api_pb2.VolumeGetByIdResponse(volume_id=vol.id, metadata=_metadata(vol))
        )

    async def VolumeHeartbeat(
        self, stream: Stream[api_pb2.VolumeHeartbeatRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        if vol.heartbeat is not None:
            vol.heartbeat = time.monotonic()
        self._sweep_ephemeral()
        await stream.send_message(empty_pb2.Empty())

    async def VolumeList(
        self, stream: Stream[api_pb2.VolumeListRequest, api_pb2.VolumeListResponse]
    ) -> None:
        """Named volumes, a page at a time, newest first (see `base.page_of`)."""
        req = await stream.recv_message()
        assert req is not None
        pagination = req.pagination if req.HasField("pagination") else None
        listed = page_of(list(self.reg.volumes_by_name.values()), _created_at, pagination)
        items = [
            api_pb2.VolumeListItem(
                label=v.name, volume_id=v.id, created_at=v.created_at, metadata=_metadata(v)
            )
            for v in listed
        ]
        await stream.send_message(
            api_pb2.VolumeListResponse(items=items, environment_name=req.environment_name)
        )

    async def VolumeRename(
        self, stream: Stream[api_pb2.VolumeRenameRequest, empty_pb2.Empty]
    ) -> None:
        """`modal volume rename`: the same volume (id, files) under a new name; the
        old name is free again. A name in use is refused, as on Modal."""
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        if not vol.name:
            fail(Status.INVALID_ARGUMENT, "an ephemeral Volume has no name to change")
        if not NAME_RE.match(req.name):
            fail(
                Status.INVALID_ARGUMENT,
                f"Invalid Volume name {req.name!r}: at most 64 letters, digits, '.', '_' or '-'",
            )
        if req.name in self.reg.volumes_by_name:
            fail(Status.ALREADY_EXISTS, f"Volume {req.name!r} already exists")
        users = self._mounted_by(vol)
        if users:
            fail(
                Status.FAILED_PRECONDITION,
                f"Volume {vol.name!r} is mounted by running sandbox(es) {', '.join(users)}",
            )
        new_path = vol.path.parent / req.name
        await asyncio.to_thread(vol.path.rename, new_path)
        del self.reg.volumes_by_name[vol.name]
        vol.name, vol.path = req.name, new_path
        self.reg.volumes_by_name[vol.name] = vol
        await stream.send_message(empty_pb2.Empty())

    async def VolumeDelete(
        self, stream: Stream[api_pb2.VolumeDeleteRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        users = self._mounted_by(vol)
        if users:
            fail(
                Status.FAILED_PRECONDITION,
                f"Volume {vol.name or vol.id!r} is mounted by running sandbox(es) "
                f"{', '.join(users)}: terminate them first",
            )
        self.reg.forget_volume(vol)
        await asyncio.to_thread(remove_tree, vol.path)
        await stream.send_message(empty_pb2.Empty())

    def _mounted_by(self, vol: VolumeInfo) -> list[str]:
        """Ids of running sandboxes that mount ``vol``."""
        return sorted(
            sb.id
            for sb in self.reg.sandboxes.values()
            if sb.returncode is None
            and any(path == vol.path for _name, path in sb.spec.volumes.values())
        )

    def _sweep_ephemeral(self) -> None:
        """Forget ephemeral volumes whose client stopped its heartbeats (and that no
        running sandbox mounts), as Modal does; their directories go in a thread."""
        now = time.monotonic()
        for vol in list(self.reg.volumes_by_id.values()):
            if vol.heartbeat is None or now - vol.heartbeat < EPHEMERAL_TIMEOUT_S:
                continue
            if self._mounted_by(vol):
                continue
            self.reg.forget_volume(vol)
            asyncio.get_running_loop().run_in_executor(None, remove_tree, vol.path)

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

        files = []
        for f in req.files:
            blocks = [blobs.path(b.contents_sha256.hex()) for b in f.blocks]
            _check_blocks(f, blocks)
            files.append(_Upload(f.path, blocks, f.mode, f.size))
        await self._write_files(vol, files, req.disallow_overwrite_existing_files)
        await stream.send_message(api_pb2.VolumePutFiles2Response())

    async def VolumeListFiles2(
        self, stream: Stream[api_pb2.VolumeListFiles2Request, api_pb2.VolumeListFiles2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        for batch in await self._list_batches(
            req.volume_id, req.path, req.recursive, req.max_entries
        ):
            await stream.send_message(api_pb2.VolumeListFiles2Response(entries=batch))

    async def VolumeListFiles(
        self, stream: Stream[api_pb2.VolumeListFilesRequest, api_pb2.VolumeListFilesResponse]
    ) -> None:
        """VolumeFS v1's listing: the same entries as v2's."""
        req = await stream.recv_message()
        assert req is not None
        for batch in await self._list_batches(
            req.volume_id, req.path, req.recursive, req.max_entries
        ):
            await stream.send_message(api_pb2.VolumeListFilesResponse(entries=batch))

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
        await self._remove(req.volume_id, req.path, req.recursive)
        await stream.send_message(empty_pb2.Empty())

    async def VolumeRemoveFile(
        self, stream: Stream[api_pb2.VolumeRemoveFileRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._remove(req.volume_id, req.path, req.recursive)
        await stream.send_message(empty_pb2.Empty())

    async def VolumeCopyFiles2(
        self, stream: Stream[api_pb2.VolumeCopyFiles2Request, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._copy(req.volume_id, list(req.src_paths), req.dst_path, req.recursive)
        await stream.send_message(empty_pb2.Empty())

    async def VolumeCopyFiles(
        self, stream: Stream[api_pb2.VolumeCopyFilesRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._copy(req.volume_id, list(req.src_paths), req.dst_path, req.recursive)
        await stream.send_message(empty_pb2.Empty())

    async def VolumePutFiles(
        self, stream: Stream[api_pb2.VolumePutFilesRequest, empty_pb2.Empty]
    ) -> None:
        """VolumeFS v1's upload: each file was sent whole with ``MountPutFile`` first."""
        req = await stream.recv_message()
        assert req is not None
        vol = self._volume(req.volume_id)
        blobs = self.ctx.blobs
        files: list[_Upload] = []
        for f in req.files:
            if not f.filename or _norm(f.filename) == "/":
                fail(Status.INVALID_ARGUMENT, f"{f.filename!r} is not a file path in a volume")
            sha = f.sha256_hex.lower()
            if not blobs.has(sha):
                fail(
                    Status.FAILED_PRECONDITION,
                    f"{f.filename!r}: its content ({sha}) was never uploaded with MountPutFile",
                )
            files.append(_Upload(f.filename, [blobs.path(sha)], f.mode))
        await self._write_files(vol, files, req.disallow_overwrite_existing_files)
        await stream.send_message(empty_pb2.Empty())

    async def _write_files(self, vol: VolumeInfo, files: list[_Upload], no_overwrite: bool) -> None:
        """Write each file into the volume, in a thread."""

        def write_all() -> None:
            with _root(vol) as root:
                for up in files:
                    try:
                        _write_file(root, up, no_overwrite)
                    except OSError as exc:
                        exc.filename = up.path
                        raise

        try:
            await asyncio.to_thread(write_all)
        except OSError as exc:
            _os_fail(exc, vol, str(exc.filename))

    async def _list_batches(
        self, volume_id: str, path: str, recursive: bool, max_entries: int
    ) -> list[list[api_pb2.FileEntry]]:
        vol = self._volume(volume_id)
        try:
            entries = await asyncio.to_thread(_list, vol, path, recursive)
        except OSError as exc:
            _os_fail(exc, vol, path)
        if max_entries:
            entries = entries[:max_entries]
        return [entries[i : i + _LIST_BATCH] for i in range(0, len(entries), _LIST_BATCH)]

    async def _remove(self, volume_id: str, path: str, recursive: bool) -> None:
        vol = self._volume(volume_id)
        try:
            await asyncio.to_thread(_remove, vol, path, recursive)
        except OSError as exc:
            _os_fail(exc, vol, path)

    async def _copy(self, volume_id: str, srcs: list[str], dst: str, recursive: bool) -> None:
        vol = self._volume(volume_id)
        if not srcs:
            fail(Status.INVALID_ARGUMENT, "copy_files: no source paths given")
        try:
            await asyncio.to_thread(_copy, vol, srcs, dst, recursive)
        except ValueError as exc:
            fail(Status.INVALID_ARGUMENT, f"copy_files in volume {vol.name or vol.id!r}: {exc}")
        except OSError as exc:
            _os_fail(exc, vol, str(exc.filename or dst))

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
