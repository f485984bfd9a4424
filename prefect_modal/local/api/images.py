"""Images: definitions are recorded layer by layer; the same definition gets the same id."""

from __future__ import annotations

import shlex

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

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
        key = img.SerializeToString(deterministic=True) + req.builder_version.encode()
        info = self.reg.image_get_or_create(key, desc, env)
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
