"""Local files: ``Image.add_local_file`` / ``add_local_dir`` / ``add_local_python_source``.

The client hashes each file, asks which contents the server lacks
(``MountBatchedCheckExistence``), sends those (``MountPutFile``, inline or, from
4 MiB, as a blob it uploads to the URL ``BlobCreate`` gives: `blobs.BlobStore`),
then names the mount's files (``MountGetOrCreate``). The server lays them out
as a tree (``<state>/mounts/<id>/tree``, the same files giving the same mount)
that every sandbox using it gets: files added
without ``copy=True`` are sent by the client with each sandbox (``mount_ids``);
with ``copy=True`` they become a layer of the image (`images`).

In an isolated sandbox the files of a mount are bound read-only, as on Modal
(at their top-most directories that are not ones the root must keep, such as
``/root`` or ``/opt``: see `ServerContext._layers`); with ``copy=True``, and
where a bind would overlap a volume or another mount, they are copies in the
sandbox's own root, which it may change. A remote path inside a directory the
local server shows read-only from this machine (``/usr``, the Python
environment) is refused with the path named: nothing can be placed there.
"""

from __future__ import annotations

import asyncio
import hashlib

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from .. import ids
from ..runtime import layers
from ..state import MountInfo
from .base import Room, fail

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Mounts(Room):
    """The mount RPCs and ``BlobCreate``."""

    async def BlobCreate(
        self, stream: Stream[api_pb2.BlobCreateRequest, api_pb2.BlobCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        blobs = self.ctx.blobs
        try:
            blob_id = blobs.new_blob(req.content_sha256_base64)
        except ValueError:
            fail(Status.INVALID_ARGUMENT, "BlobCreate: content_sha256_base64 is not base64")
        url = await blobs.put_url(blob_id=blob_id)
        await stream.send_message(
            api_pb2.BlobCreateResponse(
                blob_id=blob_id,
                upload_url=url,
                blob_ids=[blob_id],
                upload_urls=api_pb2.UploadUrlList(items=[url]),
            )
        )

    async def MountBatchedCheckExistence(
        self,
        stream: Stream[
            api_pb2.MountBatchedCheckExistenceRequest, api_pb2.MountBatchedCheckExistenceResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        missing = [h for h in req.sha256_hex_hashes if not self.ctx.blobs.has(h.lower())]
        await stream.send_message(
            api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)
        )

    async def MountPutFile(
        self, stream: Stream[api_pb2.MountPutFileRequest, api_pb2.MountPutFileResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        blobs = self.ctx.blobs
        sha = req.sha256_hex.lower()
        if req.data_blob_id:
            got = blobs.blob_sha(req.data_blob_id)
            if got is None:
                fail(Status.NOT_FOUND, f"blob {req.data_blob_id!r} was never uploaded")
            if got != sha:
                fail(
                    Status.INVALID_ARGUMENT,
                    f"blob {req.data_blob_id!r} hashes to {got}, not {req.sha256_hex}",
                )
        elif not req.data and sha != _EMPTY_SHA256 and not blobs.has(sha):
            # the client's first call only asks whether the content is here (v1 volumes)
            await stream.send_message(api_pb2.MountPutFileResponse(exists=False))
            return
        elif not blobs.has(sha):
            try:
                await asyncio.to_thread(blobs.put_bytes, req.data, sha)
            except ValueError as exc:
                fail(Status.INVALID_ARGUMENT, f"MountPutFile: {exc}")
        await stream.send_message(api_pb2.MountPutFileResponse(exists=True))

    async def MountGetOrCreate(
        self, stream: Stream[api_pb2.MountGetOrCreateRequest, api_pb2.MountGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        if req.deployment_name and not req.files:
            fail(
                Status.NOT_FOUND,
                f"Mount {req.deployment_name!r} not found: the local Modal server keeps no "
                "deployed mounts",
            )
        blobs = self.ctx.blobs
        files: list[tuple[str, str, int]] = []
        for f in req.files:
            remote = layers.abs_path(f.filename)
            problem = self.ctx.readonly_problem(remote)
            if problem is not None:
                fail(Status.INVALID_ARGUMENT, f"local file for {remote!r}: {problem}")
            sha = f.sha256_hex.lower()
            if not blobs.has(sha):
                fail(
                    Status.FAILED_PRECONDITION,
                    f"the contents of {remote!r} ({f.sha256_hex}) were never uploaded",
                )
            files.append((remote, sha, f.mode))
        files.sort()
        key = hashlib.sha256(repr(files).encode()).hexdigest()
        mount = self.reg.mounts.get(key)
        if mount is None:
            mount_id = ids.new_id("mo")
            tree = self.reg.state_dir / "mounts" / mount_id / "tree"
            await asyncio.to_thread(
                layers.materialize, [(r, blobs.path(s), m) for r, s, m in files], tree
            )
            mount = MountInfo(mount_id, tree, [r for r, _, _ in files])
            self.reg.mounts[key] = mount
            self.reg.mounts[mount_id] = mount
        await stream.send_message(
            api_pb2.MountGetOrCreateResponse(
                mount_id=mount.id,
                handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex=key),
            )
        )
