"""Secrets: named ones (defined on the server) and anonymous ones sent inline."""

from __future__ import annotations

from google.protobuf import empty_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..state import SecretInfo
from .base import CREATED_BY, Room, fail, page_of


def _metadata(info: SecretInfo) -> api_pb2.SecretMetadata:
    # creation_info: `modal secret list` shows it and pages by its created_at
    return api_pb2.SecretMetadata(
        name=info.name or "",
        keys=sorted(info.values),
        creation_info=api_pb2.CreationInfo(created_at=info.created_at, created_by=CREATED_BY),
    )


def _created_at(info: SecretInfo) -> float:
    return info.created_at


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
        await stream.send_message(
            api_pb2.SecretGetOrCreateResponse(secret_id=info.id, metadata=_metadata(info))
        )

    async def SecretList(
        self, stream: Stream[api_pb2.SecretListRequest, api_pb2.SecretListResponse]
    ) -> None:
        """Named secrets (never their values), a page at a time, newest first."""
        req = await stream.recv_message()
        assert req is not None
        pagination = req.pagination if req.HasField("pagination") else None
        listed = page_of(list(self.reg.secrets_by_name.values()), _created_at, pagination)
        env = req.environment_name or "main"
        items = [
            api_pb2.SecretListItem(
                label=s.name or "",
                secret_id=s.id,
                created_at=s.created_at,
                environment_name=env,
                metadata=_metadata(s),
            )
            for s in listed
        ]
        await stream.send_message(api_pb2.SecretListResponse(items=items, environment_name=env))

    async def SecretDelete(
        self, stream: Stream[api_pb2.SecretDeleteRequest, empty_pb2.Empty]
    ) -> None:
        """`modal secret delete`: the name is free again; sandboxes that started
        with the secret keep its values in their environment."""
        req = await stream.recv_message()
        assert req is not None
        info = self.reg.secrets_by_id.get(req.secret_id)
        if info is None or info.name is None:
            fail(Status.NOT_FOUND, f"Secret {req.secret_id!r} not found")
        self.reg.forget_secret(info)
        await stream.send_message(empty_pb2.Empty())
