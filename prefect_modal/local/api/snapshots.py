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
from pathlib import Path

from google.protobuf import empty_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import task_command_router_pb2 as sr_pb2

from .. import ids
from ..runtime import layers, mounting
from ..runtime.sandbox import LocalSandbox, SandboxFinishedError
from ..state import ImageInfo
from .base import Room, fail
from .filesystem import _makedirs

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
        skip = [*_ALWAYS_SKIPPED, *sb.spec.volumes, *sb.spec.binds]
        if sb.isolation is not None:
            view = sb.view
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
                state=base.state if base else None,
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

        def copy() -> None:
            layers.copy_tree(sb.paths.fs, dest, self._skipped(sb))
            # what its image's layers add under /usr or /etc (overlaid there, read-only,
            # so as the sandbox sees it): bottom layer first, the top one wins
            for path, lowers in sb.overlays.items():
                for lower in reversed(lowers):
                    layers.copy_tree(lower, dest / path.lstrip("/"))

        try:
            await asyncio.to_thread(copy)
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
        except OSError as exc:  # what ended it goes along: exit code and why the root is gone
            fail(
                Status.FAILED_PRECONDITION,
                f"snapshot_directory: Sandbox {sb.id} has finished "
                f"(exit code {sb.returncode}; {exc.strerror or exc})",
            )

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


class ImageMounts(Room):
    """``mount_image`` / ``unmount_image``: an image's files at a path of a running sandbox.

    The image's files (a `snapshot_directory`'s directory, or the layers of a
    filesystem snapshot or of ``add_local_*(copy=True)``) are copied for this
    sandbox (so its writes stay its own) and bound at the path; unmounting
    shows what was under it again. Only isolated sandboxes, and only images
    whose files the local server has (not a base image it stands in for).
    """

    async def TaskMountDirectory(
        self, stream: Stream[sr_pb2.TaskMountDirectoryRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self._isolated(stream, req.task_id, "mount_image")  # type: ignore[arg-type]
        path = _path_arg(req.path, "mount_image")
        sources = self._image_files(req.image_id, path)
        copy = sb.paths.root / "mounted" / ids.new_id("im")
        try:
            await asyncio.to_thread(_merge, sources, copy)
            await asyncio.to_thread(sb.own, copy)  # writable by the sandbox's root
            root = await sb.fs_root()
            try:
                await asyncio.to_thread(_makedirs, root, path)
            finally:
                root.close()
            await mounting.bind_into(await sb.wait_init(), str(copy), path)
        except (OSError, SandboxFinishedError) as exc:
            fail(Status.FAILED_PRECONDITION, f"mount_image at {path!r} in {sb.id}: {exc}")
        await stream.send_message(empty_pb2.Empty())

    async def TaskUnmountDirectory(
        self, stream: Stream[sr_pb2.TaskUnmountDirectoryRequest, empty_pb2.Empty]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self._isolated(stream, req.task_id, "unmount_image")  # type: ignore[arg-type]
        path = _path_arg(req.path, "unmount_image")
        try:
            await mounting.unmount_in(await sb.wait_init(), path)
        except (OSError, SandboxFinishedError) as exc:
            fail(
                Status.FAILED_PRECONDITION,
                f"unmount_image: nothing mounted by mount_image at {path!r} in {sb.id} ({exc})",
            )
        await stream.send_message(empty_pb2.Empty())

    def _isolated(self, stream: Stream[object, object], task_id: str, what: str) -> LocalSandbox:
        sb = self.ctx.check_router_task(stream, task_id)
        if sb.done.is_set():
            fail(Status.FAILED_PRECONDITION, f"{what}: Sandbox {sb.id} has finished")
        if sb.isolation is None:
            fail(
                Status.FAILED_PRECONDITION,
                f"{what} needs an isolated sandbox, and this local server cannot isolate them "
                f"({self.ctx.not_isolated_because})",
            )
        return sb

    def _image_files(self, image_id: str, path: str) -> list[Path]:
        if not image_id:  # Image.from_scratch(): an empty directory
            return []
        info = self.reg.images.get(image_id)
        if info is None:
            fail(Status.NOT_FOUND, f"mount_image at {path!r}: Image {image_id!r} not found")
        own = self.reg.image_dir(image_id) / "layer"
        sources = list(info.layers) or ([own] if own.is_dir() else [])
        if not sources:
            fail(
                Status.FAILED_PRECONDITION,
                f"mount_image at {path!r}: image {image_id} ({info.description}) has no files "
                "of its own on the local Modal server (it stands in for a base image with this "
                "machine's); mount a snapshot or an image of local files (copy=True)",
            )
        return sources


def _merge(sources: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for src in sources:
        layers.copy_tree(src, dest)
