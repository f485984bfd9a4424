"""Secrets: named ones (defined on the server) and anonymous ones sent inline."""

from __future__ import annotations

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from .base import Room, fail


class Secrets(Room):
    """Secrets: named ones (defined on the server) and anonymous ones sent inline."""

    async def SecretGetOrCreate(
        self, stream: Stream[api_pb2.SecretGetOrCreateRequest, api_pb2.SecretGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ot = req.object_creation_type
        values = dict(req.env_dict)
        if ot in (
            api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL,
            api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP,
        ):
            info = self.reg.anonymous_secret(values)
        elif ot == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            found = self.reg.secrets_by_name.get(req.deployment_name)
            if found is None:
                fail(
                    Status.NOT_FOUND,
                    f"Secret {req.deployment_name!r} not found on the local Modal server; "
                    "define it with "
                    "LocalModal(secrets=...), LocalModal.define_secret() or `serve --secrets-file`",
                )
            missing = [k for k in req.required_keys if k not in found.values]
            if missing:
                fail(Status.NOT_FOUND, f"Secret {req.deployment_name!r} is missing keys {missing}")
            info = found
        else:
            exists = req.deployment_name in self.reg.secrets_by_name
            if exists and ot == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
                fail(Status.ALREADY_EXISTS, f"Secret {req.deployment_name!r} already exists")
            if exists and ot == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                info = self.reg.secrets_by_name[req.deployment_name]
            else:
                try:
                    info = self.reg.define_secret(req.deployment_name, values)
                except ValueError as exc:
                    fail(Status.INVALID_ARGUMENT, str(exc))
        md = api_pb2.SecretMetadata(name=info.name or "", keys=sorted(info.values))
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=info.id, metadata=md))
