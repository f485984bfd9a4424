"""Images: definitions are recorded layer by layer; the same definition gets the same id."""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import secrets
import shlex
import shutil
from pathlib import Path

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..runtime import layers as layers_mod
from .base import Room, fail
from .context import IMAGE_BUILDER_VERSION

_IMAGE_ENV_SKIP = {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}


def _parse_env_line(cmd: str) -> dict[str, str]:
    """``ENV A=1 B=2`` or ``ENV A 1`` -> dict."""
    body = cmd[4:].strip()
    try:
        parts = shlex.split(body)
    except ValueError:
        return {}
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    out: dict[str, str] = {}
    for p in parts:
        k, _, v = p.partition("=")
        out[k] = v
    return out


class Images(Room):
    """Images: definitions are recorded layer by layer; the same definition gets the same id."""

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
            desc, env = parent.description, dict(parent.env)
        else:
            froms = [c[5:].strip() for c in cmds if c.upper().startswith("FROM ")]
            desc = froms[0] if froms else "image"
            env = {}
        if rest:
            desc = f"{desc} + {len(rest)} step{'s' if len(rest) > 1 else ''}"
        for c in rest:
            if c.upper().startswith("ENV "):
                for k, v in _parse_env_line(c).items():
                    if k not in _IMAGE_ENV_SKIP and not k.startswith("MODAL_"):
                        env[k] = v
        layers = list(parent.layers) if parent is not None else []
        if img.context_mount_id:
            layer, code = await self._copied_files(img.context_mount_id, rest)
            layers.append(layer)
            if code and "PYTHONPATH" not in env:
                env["PYTHONPATH"] = "/root"  # as on Modal, where add_local_python_source puts code
        key = img.SerializeToString(deterministic=True) + req.builder_version.encode()
        info = self.reg.image_get_or_create(key, desc, env, layers)
        g = api_pb2.GenericResult
        await stream.send_message(
            api_pb2.ImageGetOrCreateResponse(
                image_id=info.id,
                result=g(status=g.GENERIC_STATUS_SUCCESS),
                metadata=api_pb2.ImageMetadata(
                    image_builder_version=req.builder_version or IMAGE_BUILDER_VERSION
                ),
            )
        )

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
        if req.image_id not in self.reg.images:
            fail(Status.NOT_FOUND, f"Image {req.image_id!r} not found")
        g = api_pb2.GenericResult
        await stream.send_message(
            api_pb2.ImageJoinStreamingResponse(
                result=g(status=g.GENERIC_STATUS_SUCCESS), eof=True, entry_id="1"
            )
        )
