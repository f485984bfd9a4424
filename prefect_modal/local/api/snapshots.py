"""Snapshots: ``sb.snapshot_filesystem()`` and ``sb.snapshot_directory(path)``.

A filesystem snapshot is a copy of the sandbox's writable layer (its own root
directory under the state directory, as it stands: what the image's read-only
directories, volumes, ``/proc`` and ``/dev`` hold is not part of it, as on
Modal, where volumes are not in a snapshot either) into
``<state>/images/<im-id>/layer``, registered as an image whose ``layers`` are
that copy: a sandbox made from it starts with a copy of those files in its
own root. Copies, never hard links: a later write by either sandbox must not
reach the other (`runtime.layers`).

A directory snapshot copies one directory as the sandbox sees it (through its
root, so a volume or the image's files under that path are included) into an
image meant for ``mount_image``.
"""

from __future__ import annotations

import asyncio
import os

from grpclib import Status
from grpclib.server import Stream
from modal_proto import task_command_router_pb2 as sr_pb2

from .. import ids
from ..runtime import layers
from ..runtime.sandbox import LocalSandbox
from ..state import ImageInfo
from .base import Room, fail

#: container paths never taken into a snapshot (kernel file systems, made fresh)
_ALWAYS_SKIPPED = ("/proc", "/dev", "/sys")


def _path_arg(raw: bytes, what: str) -> str:
    try:
        path = raw.decode()
    except UnicodeDecodeError:
        fail(Status.INVALID_ARGUMENT, f"{what}: the path is not UTF-8")
    if not path.startswith("/"):
        fail(Status.INVALID_ARGUMENT, f"{what}: {path!r} is not an absolute path")
    return layers.abs_path(path)


class Snapshots(Room):
    """``TaskSnapshotFilesystem`` / ``TaskSnapshotDirectory`` on the command router."""

    def _running(self, stream: Stream[object, object], task_id: str, what: str) -> LocalSandbox:
        sb = self.ctx.check_router_task(stream, task_id)
        if sb.done.is_set():
            fail(Status.FAILED_PRECONDITION, f"{what}: Sandbox {sb.id} has finished")
        return sb

    def _skipped(self, sb: LocalSandbox) -> list[str]:
        skip = [*_ALWAYS_SKIPPED, *sb.spec.volumes]
        if sb.isolation is not None:
            view = sb.isolation.view
            skip += [*view.dirs, *view.host_dirs, *view.masked]
        return layers.relative_skips(skip)

    def _register(self, sb: LocalSandbox, image_id: str, description: str, *, root: bool) -> None:
        base = self.reg.images.get(sb.spec.image_id)
        layer = self.reg.image_dir(image_id) / "layer"
        self.reg.add_image(
            ImageInfo(
                image_id,
                description,
                dict(base.env) if base else {},
                [layer] if root else [],
            )
        )

    async def TaskSnapshotFilesystem(
        self,
        stream: Stream[sr_pb2.TaskSnapshotFilesystemRequest, sr_pb2.TaskSnapshotFilesystemResponse],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self._running(stream, req.task_id, "snapshot_filesystem")  # type: ignore[arg-type]
        image_id = ids.new_id("im")
        dest = self.reg.image_dir(image_id) / "layer"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(layers.copy_tree, sb.paths.fs, dest, self._skipped(sb))
        except OSError as exc:
            fail(
                Status.FAILED_PRECONDITION,
                f"snapshot_filesystem of {sb.id}: cannot copy {exc.filename!r}: {exc.strerror}",
            )
        self._register(sb, image_id, f"snapshot of {sb.id}", root=True)
        await stream.send_message(sr_pb2.TaskSnapshotFilesystemResponse(image_id=image_id))

    async def TaskSnapshotDirectory(
        self,
        stream: Stream[sr_pb2.TaskSnapshotDirectoryRequest, sr_pb2.TaskSnapshotDirectoryResponse],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self._running(stream, req.task_id, "snapshot_directory")  # type: ignore[arg-type]
        path = _path_arg(req.path, "snapshot_directory")
        image_id = ids.new_id("im")
        dest = self.reg.image_dir(image_id) / "layer"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            root = await sb.fs_root()
        except OSError:
            fail(Status.FAILED_PRECONDITION, f"snapshot_directory: Sandbox {sb.id} has finished")

        def copy() -> None:
            try:
                fd = root.open(path, os.O_PATH | os.O_DIRECTORY)
            finally:
                root.close()
            try:
                layers.copy_tree(f"/proc/self/fd/{fd}", dest)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(copy)
        except NotADirectoryError:
            fail(Status.INVALID_ARGUMENT, f"snapshot_directory: {path!r} is not a directory")
        except FileNotFoundError:
            fail(Status.NOT_FOUND, f"snapshot_directory: {path!r} does not exist in {sb.id}")
        except OSError as exc:
            fail(
                Status.FAILED_PRECONDITION,
                f"snapshot_directory of {path!r} in {sb.id}: {exc.strerror}",
            )
        self._register(sb, image_id, f"snapshot of {path} in {sb.id}", root=False)
        await stream.send_message(sr_pb2.TaskSnapshotDirectoryResponse(image_id=image_id))
