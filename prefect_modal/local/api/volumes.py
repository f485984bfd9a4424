"""Volumes: named directories in the server's state directory."""

from __future__ import annotations

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from .base import NAME_RE, Room, fail


class Volumes(Room):
    """Volumes: named directories in the server's state directory."""

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
