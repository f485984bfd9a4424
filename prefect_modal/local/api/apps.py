"""Apps, environments and the client's hello: what every client call starts with."""

from __future__ import annotations

from typing import Any

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from .base import NAME_RE, Room, fail
from .context import IMAGE_BUILDER_VERSION


class Apps(Room):
    """Apps, environments and the client's hello: what every client call starts with."""

    async def ClientHello(self, stream: Stream[Any, api_pb2.ClientHelloResponse]) -> None:
        await stream.recv_message()
        await stream.send_message(
            api_pb2.ClientHelloResponse(image_builder_version=IMAGE_BUILDER_VERSION)
        )

    async def AuthTokenGet(
        self, stream: Stream[api_pb2.AuthTokenGetRequest, api_pb2.AuthTokenGetResponse]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(
            api_pb2.AuthTokenGetResponse(token=self.ctx.creds.mint_jwt("client"))
        )

    async def AppGetOrCreate(
        self, stream: Stream[api_pb2.AppGetOrCreateRequest, api_pb2.AppGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        if not NAME_RE.match(req.app_name):
            fail(Status.INVALID_ARGUMENT, f"invalid app name {req.app_name!r}")
        ot = req.object_creation_type
        if ot == api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL:
            app_id: str | None = self.reg.ephemeral_app(req.app_name)
        else:
            create = ot in (
                api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
                api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS,
            )
            app_id = self.reg.app_get_or_create(req.app_name, req.environment_name, create)
        if app_id is None:
            fail(Status.NOT_FOUND, f"App {req.app_name!r} not found; use create_if_missing=True")
        md = api_pb2.AppHandleMetadata(
            app_id=app_id, environment_name=req.environment_name or "main"
        )
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id, handle_metadata=md))

    async def EnvironmentGetOrCreate(
        self,
        stream: Stream[
            api_pb2.EnvironmentGetOrCreateRequest, api_pb2.EnvironmentGetOrCreateResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        env_id = self.reg.environment_id(req.deployment_name)
        md = api_pb2.EnvironmentMetadata(
            name=req.deployment_name or "main",
            settings=api_pb2.EnvironmentSettings(image_builder_version=IMAGE_BUILDER_VERSION),
        )
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(environment_id=env_id, metadata=md)
        )
