"""Images: definitions are recorded layer by layer; the same definition gets the same id."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import secrets
import shlex
import shutil
from pathlib import Path

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..build import recipe as recipe_mod
from ..build.builder import ImageBuildError, ImageState
from ..runtime import layers as layers_mod
from ..state import ImageInfo
from .base import Room, fail
from .context import IMAGE_BUILDER_VERSION

log = logging.getLogger("prefect_modal.local")

#: How many lines of a failed build's log its error carries.
BUILD_LOG_TAIL_LINES = 25

_IMAGE_ENV_SKIP = {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}


class BuildJob:
    """One image's build: its log lines (entry ids are their positions) and result."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = asyncio.Event()
        self.result: api_pb2.GenericResult | None = None

    def log(self, text: str) -> None:
        if text:
            self.lines.append(text)
            self.changed.set()

    def tail(self, count: int) -> str:
        """The last ``count`` lines of the log."""
        return "\n".join("".join(self.lines).splitlines()[-count:])

    def finish(self, result: api_pb2.GenericResult) -> None:
        self.result = result
        self.changed.set()


_G = api_pb2.GenericResult


def _failed(message: str) -> api_pb2.GenericResult:
    return _G(status=_G.GENERIC_STATUS_FAILURE, exception=message)


class Images(Room):
    """Images: each definition built layer by layer (`build`); the same definition
    gets the same id, a built layer is found in the shared cache."""

    async def ImageGetOrCreate(
        self, stream: Stream[api_pb2.ImageGetOrCreateRequest, api_pb2.ImageGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        img = req.image
        parent = None
        for b in img.base_images:
            parent = self.reg.images.get(b.image_id) or parent
        cmds = list(img.dockerfile_commands)
        rest = [c for c in cmds if not c.upper().startswith("FROM ")]
        if parent is not None:
            desc = parent.description
        else:
            froms = [c[5:].strip() for c in cmds if c.upper().startswith("FROM ")]
            desc = froms[0] if froms else "image"
        if rest:
            desc = f"{desc} + {len(rest)} step{'s' if len(rest) > 1 else ''}"
        context = {f.filename: f.data.decode("utf-8", "replace") for f in img.context_files}
        recipe = recipe_mod.parse(cmds, context)
        code = False
        if img.context_mount_id:
            layer, code = await self._copied_files(img.context_mount_id, rest)
            for step in recipe.steps:
                if step.kind == "copy":
                    step.data = {"mount": img.context_mount_id, "layer": str(layer)}
        key = img.SerializeToString(deterministic=True) + req.builder_version.encode()
        info = self.reg.image_get_or_create(key, desc, {}, [])
        metadata = api_pb2.ImageMetadata(
            image_builder_version=req.builder_version or IMAGE_BUILDER_VERSION
        )
        result: api_pb2.GenericResult | None = None
        if info.state is not None:
            result = _G(status=_G.GENERIC_STATUS_SUCCESS)
            self.ctx.builder.cache.hits += 1
        elif info.build is not None and info.build.result is not None:
            result = info.build.result
        elif info.build is None:
            builder = self.ctx.builder
            parent_state = parent.state if parent is not None else None
            try:
                planned = builder.planned_key(recipe, parent_state)
            except ImageBuildError as exc:
                planned, result = "", _failed(str(exc))
            cached = builder.lookup(planned) if planned else None
            if cached is not None:
                builder.cache.hits += 1
                self._built(info, cached, parent, code)
                result = _G(status=_G.GENERIC_STATUS_SUCCESS)
            elif result is None:
                info.build = BuildJob()
                self.ctx.spawn_background(self._build(info, recipe, parent, code))
            else:
                info.build = BuildJob()
                info.build.finish(result)
        await stream.send_message(
            api_pb2.ImageGetOrCreateResponse(
                image_id=info.id, result=result or _G(), metadata=metadata
            )
        )

    def _built(
        self, info: ImageInfo, state: ImageState, parent: ImageInfo | None, code: bool
    ) -> None:
        env = {k: v for k, v in state.env.items() if k not in _IMAGE_ENV_SKIP}
        env = {k: v for k, v in env.items() if not k.startswith("MODAL_")}
        layers = [Path(p) for p in state.layers]
        if state.kind == "host" and parent is not None and parent.state is None:
            layers = [*parent.layers, *layers]  # a snapshot's files under a registry image
        inherited = parent is not None and "PYTHONPATH" in parent.env
        if (code or inherited) and "PYTHONPATH" not in env:
            env["PYTHONPATH"] = "/root"  # as on Modal, where add_local_python_source puts code
        info.env, info.layers, info.state = env, layers, state

    async def _build(
        self, info: ImageInfo, recipe: recipe_mod.Recipe, parent: ImageInfo | None, code: bool
    ) -> None:
        job = info.build
        assert isinstance(job, BuildJob)
        try:
            state = await self.ctx.builder.build(
                recipe, parent.state if parent is not None else None, job.log
            )
        except ImageBuildError as exc:
            tail = job.tail(BUILD_LOG_TAIL_LINES)
            job.log(f"{exc}\n")
            # the log's end goes with the error: a client without enable_output() (a
            # worker, a per-step runner) shows only the exception, and it should say why
            job.finish(
                _failed(f"{exc}\n--- last lines of the build log ---\n{tail}" if tail else str(exc))
            )
            return
        except Exception as exc:  # a bug or the machine: the client must hear of it
            log.exception("building image %s failed", info.id)
            tail = job.tail(BUILD_LOG_TAIL_LINES)
            message = f"the local image build failed: {exc!r}"
            # every ImageBuildError carries its log's end, this one too
            job.finish(
                _failed(
                    f"{message}\n--- last lines of the build log ---\n{tail}" if tail else message
                )
            )
            return
        self._built(info, state, parent, code)
        job.finish(_G(status=_G.GENERIC_STATUS_SUCCESS))

    async def _copied_files(self, mount_id: str, commands: list[str]) -> tuple[Path, bool]:
        """``add_local_*(copy=True)``: the mount's files as a layer of the image (the
        client sends ``COPY . <dest>``); and whether they put code under /root."""
        mount = self.reg.mounts.get(mount_id)
        if mount is None:
            fail(Status.NOT_FOUND, f"Mount {mount_id!r} not found (was the server restarted?)")
        copies = [c for c in commands if c.upper().startswith("COPY ")]
        parts = shlex.split(copies[0])[1:] if len(copies) == 1 else []
        if len(parts) != 2 or parts[0] != ".":
            fail(
                Status.UNIMPLEMENTED,
                f"the local Modal server copies local files into an image only as "
                f"'COPY . <path>', not {copies!r}",
            )
        dest = layers_mod.abs_path(parts[1])
        for path in mount.paths:
            problem = self.ctx.readonly_problem(posixpath.join(dest, path.lstrip("/")))
            if problem is not None:
                fail(Status.INVALID_ARGUMENT, f"add_local_*(copy=True): {problem}")
        code = any(posixpath.join(dest, p.lstrip("/")).startswith("/root/") for p in mount.paths)
        if dest == "/":
            return mount.tree, code
        layer = mount.tree.parent / "at" / hashlib.sha256(dest.encode()).hexdigest()[:16]
        if not layer.exists():
            tmp = layer.with_name(f"{layer.name}.{secrets.token_hex(4)}.tmp")
            await asyncio.to_thread(layers_mod.copy_tree, mount.tree, tmp / dest.lstrip("/"))
            try:
                os.rename(tmp, layer)
            except OSError:  # made meanwhile by the same request sent twice
                shutil.rmtree(tmp, ignore_errors=True)
        return layer, code

    async def ImageFromId(
        self, stream: Stream[api_pb2.ImageFromIdRequest, api_pb2.ImageFromIdResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        if req.image_id not in self.reg.images:
            fail(
                Status.NOT_FOUND,
                f"Image {req.image_id!r} not found (images live as long as the local server)",
            )
        await stream.send_message(
            api_pb2.ImageFromIdResponse(
                image_id=req.image_id,
                metadata=api_pb2.ImageMetadata(image_builder_version=IMAGE_BUILDER_VERSION),
            )
        )

    async def ImageJoinStreaming(
        self, stream: Stream[api_pb2.ImageJoinStreamingRequest, api_pb2.ImageJoinStreamingResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        info = self.reg.images.get(req.image_id)
        if info is None:
            fail(Status.NOT_FOUND, f"Image {req.image_id!r} not found")
        job = info.build
        metadata = api_pb2.ImageMetadata(image_builder_version=IMAGE_BUILDER_VERSION)
        if not isinstance(job, BuildJob):
            await stream.send_message(
                api_pb2.ImageJoinStreamingResponse(
                    result=_G(status=_G.GENERIC_STATUS_SUCCESS), eof=True, metadata=metadata
                )
            )
            return
        pos = int(req.last_entry_id) if req.last_entry_id.isdigit() else 0
        deadline = asyncio.get_running_loop().time() + (req.timeout or 55.0)
        while True:
            job.changed.clear()
            if pos < len(job.lines):
                lines, pos = job.lines[pos:], len(job.lines)
                logs = [
                    api_pb2.TaskLogs(data=line, file_descriptor=api_pb2.FILE_DESCRIPTOR_STDOUT)
                    for line in lines
                ]
                await stream.send_message(
                    api_pb2.ImageJoinStreamingResponse(task_logs=logs, entry_id=str(pos))
                )
            if job.result is not None and pos >= len(job.lines):
                await stream.send_message(
                    api_pb2.ImageJoinStreamingResponse(
                        result=job.result, eof=True, entry_id=str(pos), metadata=metadata
                    )
                )
                return
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return  # the client asks again from its last entry id
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.changed.wait(), left)
