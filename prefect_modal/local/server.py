"""The gRPC handlers: Modal's control plane and task command router on one port.

The real modal client (1.6.4) talks to this server unchanged. Every RPC the
client makes for the supported calls is answered here; every other RPC answers
``UNIMPLEMENTED``. No exception may escape a handler: grpclib would send
``UNKNOWN``, which the client retries silently for seconds, so errors are
mapped to NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION or ALREADY_EXISTS
with a message that names what was wrong (and never a secret value).

Authentication: control-plane calls must carry the server's token pair; router
calls must carry a JWT this server minted for the task they name (see `auth`).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import re
import shlex
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpclib.events
from grpclib import GRPCError, Status
from grpclib.exceptions import StreamTerminatedError
from grpclib.server import Stream
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as sr_pb2
from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from . import ids, processes
from .auth import Credentials
from .forkserver import ForkServer
from .runtime import (
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    ExecProcess,
    LocalSandbox,
    SandboxPaths,
    SandboxSpec,
)
from .state import Registry
from .streams import OutputBuffer, chunk_end, utf8_safe_end

log = logging.getLogger("prefect_modal.local")

VERIFIED_CLIENT_VERSIONS: tuple[str, ...] = ("1.6.4",)
IMAGE_BUILDER_VERSION = "2024.10"
_CONTROL_PREFIX = "/modal.client.ModalClient/"
_ROUTER_PREFIX = "/modal.task_command_router.TaskCommandRouter/"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_IMAGE_ENV_SKIP = {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}
_LIST_PAGE = 100
_MAX_WAIT_S = 55.0


class ClientVersionWarning(UserWarning):
    """The connecting modal client is not a version this server was verified with."""


def fail(status: Status, message: str) -> NoReturn:
    raise GRPCError(status, message)


Handler = Callable[[Any, Stream[Any, Any]], Awaitable[None]]


def guarded(fn: Handler) -> Handler:
    """Turn any unexpected exception into FAILED_PRECONDITION (UNKNOWN would be retried)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, stream: Stream[Any, Any]) -> None:
        try:
            await fn(self, stream)
        except (GRPCError, StreamTerminatedError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("local server error in %s: %s", fn.__name__, type(exc).__name__)
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"local Modal server error in {fn.__name__}: {type(exc).__name__}",
            ) from None

    return wrapper


def _unimplemented(name: str) -> Handler:
    async def handler(self: Any, stream: Stream[Any, Any]) -> None:
        raise GRPCError(
            Status.UNIMPLEMENTED, f"{name} is not implemented by the local Modal server"
        )

    handler.__name__ = name
    return handler


def finalize_servicer(cls: type) -> type:
    """Guard every implemented RPC and answer the rest with UNIMPLEMENTED."""
    for name in list(getattr(cls, "__abstractmethods__", ())):
        setattr(cls, name, _unimplemented(name))
    for base in cls.__mro__[1:]:
        for name, member in vars(base).items():
            if getattr(member, "__isabstractmethod__", False) and name in vars(cls):
                impl = vars(cls)[name]
                if not getattr(impl, "__isabstractmethod__", False) and not hasattr(
                    impl, "__wrapped__"
                ):
                    setattr(cls, name, guarded(impl))
    abc.update_abstractmethods(cls)
    return cls


def _gpu_string(cfg: api_pb2.GPUConfig) -> str | None:
    kind = cfg.gpu_type
    if not kind and cfg.type:
        kind = api_pb2.GPUType.Name(cfg.type).removeprefix("GPU_TYPE_")
    if not kind:
        return None
    return f"{kind}:{cfg.count}" if cfg.count and cfg.count > 1 else kind


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


class ServerContext:
    """What both services share: state, credentials, settings."""

    def __init__(
        self,
        registry: Registry,
        creds: Credentials,
        *,
        refuse_gpu: bool,
        server_uid: str,
        fork_server: bool = True,
    ) -> None:
        self.registry = registry
        self.creds = creds
        self.refuse_gpu = refuse_gpu
        self.server_uid = server_uid
        self.url = ""
        self.sweeper = processes.Sweeper()
        self.forkserver = ForkServer(registry.state_dir) if fork_server else None
        self._warned_versions: set[str] = set()

    # ----- auth hook -------------------------------------------------------

    async def on_request(self, event: grpclib.events.RecvRequest) -> None:
        md = event.metadata
        name = event.method_name
        if name.startswith(_ROUTER_PREFIX):
            auth = str(md.get("authorization", ""))
            token = auth.removeprefix("Bearer ").strip()
            if not token or self.creds.verify_jwt(token) is None:
                fail(Status.UNAUTHENTICATED, "missing or invalid command router token")
            return
        version = str(md.get("x-modal-client-version", ""))
        if (
            version
            and version not in VERIFIED_CLIENT_VERSIONS
            and version not in self._warned_versions
        ):
            self._warned_versions.add(version)
            msg = (
                f"modal client {version} connected; the local Modal server is verified with "
                f"{', '.join(VERIFIED_CLIENT_VERSIONS)} only: some calls may fail"
            )
            log.warning(msg)
            warnings.warn(msg, ClientVersionWarning, stacklevel=1)
        token_id = md.get("x-modal-token-id")
        token_secret = md.get("x-modal-token-secret")
        if not self.creds.check_tokens(
            str(token_id) if token_id else None, str(token_secret) if token_secret else None
        ):
            fail(Status.UNAUTHENTICATED, "invalid or missing Modal token for the local server")

    def check_router_task(self, stream: Stream[Any, Any], task_id: str) -> LocalSandbox:
        md = stream.metadata or {}
        token = str(md.get("authorization", "")).removeprefix("Bearer ").strip()
        if self.creds.verify_jwt(token) != task_id:
            fail(Status.UNAUTHENTICATED, "command router token is not valid for this task")
        sb = self.registry.by_task.get(task_id)
        if sb is None:
            fail(Status.NOT_FOUND, f"task {task_id} not found")
        return sb

    # ----- lookups ---------------------------------------------------------

    def sandbox(self, sandbox_id: str) -> LocalSandbox:
        sb = self.registry.sandboxes.get(sandbox_id)
        if sb is None:
            fail(Status.NOT_FOUND, f"Sandbox {sandbox_id!r} not found")
        return sb

    def router_access(self, sb: LocalSandbox) -> tuple[str, str]:
        return self.url, self.creds.mint_jwt(sb.task_id)

    # ----- sandbox creation ------------------------------------------------

    async def create_sandbox(
        self,
        version: int,
        app_id: str,
        definition: api_pb2.Sandbox,
        tags: list[api_pb2.SandboxTag],
        secret_sources: list[api_pb2.SecretSource],
    ) -> LocalSandbox:
        reg = self.registry
        d = definition
        if app_id not in reg.app_names:
            fail(Status.NOT_FOUND, f"App {app_id!r} not found (was the local server restarted?)")
        timeout = d.timeout_secs or DEFAULT_TIMEOUT_S
        if timeout > MAX_TIMEOUT_S:
            fail(
                Status.INVALID_ARGUMENT,
                f"timeout={timeout}s is above the maximum of {MAX_TIMEOUT_S}s (24 h)",
            )
        gpu = _gpu_string(d.resources.gpu_config) if d.HasField("resources") else None
        if gpu and self.refuse_gpu:
            fail(
                Status.FAILED_PRECONDITION,
                f"gpu={gpu!r} was requested, but this local Modal server was started with "
                "refuse_gpu=True (--refuse-gpu): it has no GPUs. "
                "Run on Modal, or drop the gpu request.",
            )
        name = d.name or None
        if name is not None and reg.running_with_name(app_id, name) is not None:
            fail(
                Status.ALREADY_EXISTS,
                f"a running Sandbox named {name!r} already exists in this app",
            )

        image = reg.images.get(d.image_id)
        env: dict[str, str] = dict(image.env) if image else {}
        env_names: list[str] = []
        secret_names: list[str] = []

        def add_secret(secret_id: str) -> None:
            info = reg.secrets_by_id.get(secret_id)
            if info is None:
                fail(Status.NOT_FOUND, f"Secret {secret_id!r} not found")
            env.update(info.values)
            if info.name:
                secret_names.append(info.name)
            else:
                env_names.extend(info.values)

        for sid in d.secret_ids:
            add_secret(sid)
        for src in secret_sources:
            if src.secret_id:
                add_secret(src.secret_id)
            else:
                values = dict(src.env.contents)
                env.update(values)
                env_names.extend(values)

        volumes: dict[str, tuple[str, Path]] = {}
        for vm in d.volume_mounts:
            vol = reg.volumes_by_id.get(vm.volume_id)
            if vol is None:
                fail(Status.NOT_FOUND, f"Volume {vm.volume_id!r} not found")
            volumes[vm.mount_path] = (vol.name, vol.path)

        res = d.resources
        cloud = d.cloud_provider_str or (
            api_pb2.CloudProvider.Name(d.cloud_provider).removeprefix("CLOUD_PROVIDER_").lower()
            if d.cloud_provider
            else None
        )
        spec = SandboxSpec(
            version=version,
            app_id=app_id,
            app_name=reg.app_names.get(app_id),
            name=name,
            args=list(d.entrypoint_args),
            env=env,
            env_names=sorted(set(env_names)),
            secret_names=list(dict.fromkeys(secret_names)),
            workdir=d.workdir or None,
            timeout_s=float(timeout),
            idle_timeout_s=float(d.idle_timeout_secs) if d.idle_timeout_secs else None,
            cpu=res.milli_cpu / 1000 if res.milli_cpu else None,
            memory_mib=res.memory_mb or None,
            memory_max_mib=res.memory_mb_max or None,
            gpu=gpu,
            region=",".join(d.scheduler_placement.regions) or None,
            cloud=cloud,
            image=image.description if image else (d.image_id or "default"),
            volumes=volumes,
            tags={t.tag_name: t.tag_value for t in tags},
        )
        sandbox_id = ids.new_sandbox_id(version)
        sb = LocalSandbox(
            spec,
            sandbox_id=sandbox_id,
            task_id=ids.new_task_id(version),
            paths=SandboxPaths(reg.state_dir / "sandboxes" / sandbox_id),
            marker=f"{self.server_uid}:{sandbox_id}",
            on_change=reg.changed,
            sweeper=self.sweeper,
            forkserver=self.forkserver,
        )
        reg.add_sandbox(sb)
        await sb.start()
        await reg.flushed()  # the listing shows it before the client hears of it
        log.debug(
            "sandbox %s started (v%d, app %s, name %s, argv[0] %s)",
            sandbox_id,
            version,
            spec.app_name,
            name,
            spec.args[0] if spec.args else "-",
        )
        return sb

    def handle_metadata(self, sb: LocalSandbox) -> api_pb2.SandboxHandleMetadata:
        res = sb.result()
        md = api_pb2.SandboxHandleMetadata(app_id=sb.spec.app_id)
        if res is not None:
            md.result.CopyFrom(res)
        return md

    def wait_response(self, sb: LocalSandbox) -> api_pb2.SandboxWaitResponse:
        resp = api_pb2.SandboxWaitResponse(metadata=self.handle_metadata(sb))
        res = sb.result()
        if res is not None:
            resp.result.CopyFrom(res)
        return resp

    def sandbox_info(self, sb: LocalSandbox) -> api_pb2.SandboxInfo:
        res = sb.result()
        task = api_pb2.TaskInfo(id=sb.task_id, sandbox_id=sb.id, started_at=sb.created_at)
        if res is not None:
            task.result.CopyFrom(res)
            task.finished_at = sb.finished_at or 0.0
        return api_pb2.SandboxInfo(
            id=sb.id,
            created_at=sb.created_at,
            task_info=task,
            app_id=sb.spec.app_id,
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()],
            name=sb.spec.name or "",
            timeout_secs=int(sb.spec.timeout_s),
            metadata=self.handle_metadata(sb),
        )

    def list_page(self, req: api_pb2.SandboxListRequest) -> api_pb2.SandboxListResponse:
        want_tags = {t.tag_name: t.tag_value for t in req.tags}
        found = []
        for sb in self.registry.sandboxes.values():
            if req.app_id and sb.spec.app_id != req.app_id:
                continue
            if not req.include_finished and sb.done.is_set():
                continue
            if req.before_timestamp and not sb.created_at < req.before_timestamp:
                continue
            if any(sb.tags.get(k) != v for k, v in want_tags.items()):
                continue
            found.append(sb)
        found.sort(key=lambda s: s.created_at, reverse=True)
        return api_pb2.SandboxListResponse(
            sandboxes=[self.sandbox_info(s) for s in found[:_LIST_PAGE]]
        )

    def from_name(
        self, req: api_pb2.SandboxGetFromNameRequest
    ) -> api_pb2.SandboxGetFromNameResponse:
        reg = self.registry
        app_id = reg.app_get_or_create(req.app_name, req.environment_name, create=False)
        if app_id is None:
            fail(Status.NOT_FOUND, f"App {req.app_name!r} not found")
        sb = reg.running_with_name(app_id, req.sandbox_name)
        if sb is None and req.include_terminated:
            named = [
                s
                for s in reg.sandboxes.values()
                if s.spec.app_id == app_id and s.spec.name == req.sandbox_name
            ]
            sb = max(named, key=lambda s: s.created_at) if named else None
        if sb is None:
            fail(
                Status.NOT_FOUND, f"Sandbox {req.sandbox_name!r} not found in app {req.app_name!r}"
            )
        return api_pb2.SandboxGetFromNameResponse(
            sandbox_id=sb.id, metadata=self.handle_metadata(sb)
        )


@finalize_servicer
class ControlPlane(ModalClientBase):
    """The ``modal.client.ModalClient`` service, as far as sandboxes need it."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.reg = ctx.registry

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
        if not _NAME_RE.match(req.app_name):
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

    async def VolumeGetOrCreate(
        self, stream: Stream[api_pb2.VolumeGetOrCreateRequest, api_pb2.VolumeGetOrCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        name = req.deployment_name
        if not _NAME_RE.match(name):
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

    # ----- sandboxes -------------------------------------------------------

    async def SandboxCreateV2(
        self, stream: Stream[api_pb2.SandboxCreateV2Request, api_pb2.SandboxCreateV2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sources = list(req.secret_sources)
        if req.HasField("ephemeral_secrets"):
            sources.append(api_pb2.SecretSource(env=req.ephemeral_secrets))
        sb = await self.ctx.create_sandbox(2, req.app_id, req.definition, list(req.tags), sources)
        url, jwt = self.ctx.router_access(sb)
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sb.id,
                task_id=sb.task_id,
                metadata=self.ctx.handle_metadata(sb),
                command_router_access=api_pb2.CommandRouterAccess(url=url, jwt=jwt),
            )
        )

    async def SandboxCreate(
        self, stream: Stream[api_pb2.SandboxCreateRequest, api_pb2.SandboxCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = await self.ctx.create_sandbox(1, req.app_id, req.definition, list(req.tags), [])
        await stream.send_message(
            api_pb2.SandboxCreateResponse(sandbox_id=sb.id, metadata=self.ctx.handle_metadata(sb))
        )

    async def _task_id(
        self, stream: Stream[api_pb2.SandboxGetTaskIdRequest, api_pb2.SandboxGetTaskIdResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        resp = api_pb2.SandboxGetTaskIdResponse(task_id=sb.task_id)
        res = sb.result()
        if res is not None:
            resp.task_result.CopyFrom(res)
        await stream.send_message(resp)

    async def SandboxGetTaskId(
        self, stream: Stream[api_pb2.SandboxGetTaskIdRequest, api_pb2.SandboxGetTaskIdResponse]
    ) -> None:
        await self._task_id(stream)

    async def SandboxGetTaskIdV2(
        self, stream: Stream[api_pb2.SandboxGetTaskIdRequest, api_pb2.SandboxGetTaskIdResponse]
    ) -> None:
        await self._task_id(stream)

    async def SandboxGetCommandRouterAccess(
        self,
        stream: Stream[
            api_pb2.SandboxGetCommandRouterAccessRequest,
            api_pb2.SandboxGetCommandRouterAccessResponse,
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        if req.sandbox_id:
            sb = self.ctx.sandbox(req.sandbox_id)
        else:
            found = self.reg.by_task.get(req.task_id)
            if found is None:
                fail(Status.NOT_FOUND, f"task {req.task_id!r} not found")
            sb = found
        url, jwt = self.ctx.router_access(sb)
        await stream.send_message(api_pb2.SandboxGetCommandRouterAccessResponse(url=url, jwt=jwt))

    async def TaskGetCommandRouterAccess(
        self,
        stream: Stream[
            api_pb2.TaskGetCommandRouterAccessRequest, api_pb2.TaskGetCommandRouterAccessResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.reg.by_task.get(req.task_id)
        if sb is None:
            fail(Status.NOT_FOUND, f"task {req.task_id!r} not found")
        url, jwt = self.ctx.router_access(sb)
        await stream.send_message(api_pb2.TaskGetCommandRouterAccessResponse(url=url, jwt=jwt))

    async def _wait(
        self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        await sb.wait(min(max(req.timeout, 0.0), _MAX_WAIT_S))
        await self.ctx.registry.flushed()
        await stream.send_message(self.ctx.wait_response(sb))

    async def SandboxWait(
        self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]
    ) -> None:
        await self._wait(stream)

    async def SandboxWaitV2(
        self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]
    ) -> None:
        await self._wait(stream)

    async def _terminate(
        self, stream: Stream[api_pb2.SandboxTerminateRequest, api_pb2.SandboxTerminateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        resp = api_pb2.SandboxTerminateResponse()
        existing = sb.result()
        if existing is not None:
            resp.existing_result.CopyFrom(existing)
        else:
            await sb.terminate()
            log.debug("sandbox %s terminated", sb.id)
        await self.ctx.registry.flushed()
        await stream.send_message(resp)

    async def SandboxTerminate(
        self, stream: Stream[api_pb2.SandboxTerminateRequest, api_pb2.SandboxTerminateResponse]
    ) -> None:
        await self._terminate(stream)

    async def SandboxTerminateV2(
        self, stream: Stream[api_pb2.SandboxTerminateRequest, api_pb2.SandboxTerminateResponse]
    ) -> None:
        await self._terminate(stream)

    async def SandboxList(
        self, stream: Stream[api_pb2.SandboxListRequest, api_pb2.SandboxListResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(self.ctx.list_page(req))

    async def SandboxListV2(
        self, stream: Stream[api_pb2.SandboxListRequest, api_pb2.SandboxListResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(self.ctx.list_page(req))

    async def SandboxGetFromName(
        self, stream: Stream[api_pb2.SandboxGetFromNameRequest, api_pb2.SandboxGetFromNameResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(self.ctx.from_name(req))

    async def SandboxGetFromNameV2(
        self, stream: Stream[api_pb2.SandboxGetFromNameRequest, api_pb2.SandboxGetFromNameResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(self.ctx.from_name(req))

    async def _tags_get(
        self, stream: Stream[api_pb2.SandboxTagsGetRequest, api_pb2.SandboxTagsGetResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        tags = [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()]
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags))

    async def _tags_set(self, stream: Stream[api_pb2.SandboxTagsSetRequest, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        sb.tags = {t.tag_name: t.tag_value for t in req.tags}  # replaces the whole set, as on Modal
        self.reg.changed()
        await self.reg.flushed()
        from google.protobuf import empty_pb2

        await stream.send_message(empty_pb2.Empty())

    async def SandboxTagsGet(
        self, stream: Stream[api_pb2.SandboxTagsGetRequest, api_pb2.SandboxTagsGetResponse]
    ) -> None:
        await self._tags_get(stream)

    async def SandboxTagsGetV2(
        self, stream: Stream[api_pb2.SandboxTagsGetRequest, api_pb2.SandboxTagsGetResponse]
    ) -> None:
        await self._tags_get(stream)

    async def SandboxTagsSet(self, stream: Stream[api_pb2.SandboxTagsSetRequest, Any]) -> None:
        await self._tags_set(stream)

    async def SandboxTagsSetV2(self, stream: Stream[api_pb2.SandboxTagsSetRequest, Any]) -> None:
        await self._tags_set(stream)

    async def SandboxGetLogs(
        self, stream: Stream[api_pb2.SandboxGetLogsRequest, api_pb2.TaskLogsBatch]
    ) -> None:
        """V1 logs: text batches keyed by byte offset (``entry_id``), then one ``eof`` batch."""
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        fd = req.file_descriptor
        if fd == api_pb2.FILE_DESCRIPTOR_STDOUT:
            buf = sb.stdout
        elif fd == api_pb2.FILE_DESCRIPTOR_STDERR:
            buf = sb.stderr
        else:
            buf = OutputBuffer()
            await sb.done.wait()
            buf.close()
        try:
            offset = int(req.last_entry_id or 0)
        except ValueError:
            offset = 0
        deadline = time.monotonic() + min(req.timeout or _MAX_WAIT_S, _MAX_WAIT_S)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await buf.wait_for_more(offset, left):
                return  # no eof: the client reconnects from last_entry_id
            size = len(buf.data)
            if size > offset:
                end = chunk_end(buf.data, offset)
                cut = utf8_safe_end(buf.data, offset, end)
                if cut == offset:  # one incomplete character so far
                    if not buf.closed:
                        if not await buf.wait_for_more(
                            size, max(deadline - time.monotonic(), 0.001)
                        ):
                            return
                        continue
                    cut = size
                text = bytes(buf.data[offset:cut]).decode("utf-8", errors="replace")
                item = api_pb2.TaskLogs(data=text, file_descriptor=fd, timestamp=time.time())
                await stream.send_message(
                    api_pb2.TaskLogsBatch(
                        items=[item], entry_id=str(cut), task_id=sb.task_id, sandbox_id=sb.id
                    )
                )
                offset = cut
                continue
            if buf.closed:
                await stream.send_message(
                    api_pb2.TaskLogsBatch(
                        eof=True, entry_id=str(offset), task_id=sb.task_id, sandbox_id=sb.id
                    )
                )
                return

    async def SandboxStdinWrite(
        self, stream: Stream[api_pb2.SandboxStdinWriteRequest, api_pb2.SandboxStdinWriteResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        await sb.stdin_write_indexed(req.index, req.input, req.eof)
        await stream.send_message(api_pb2.SandboxStdinWriteResponse())


def _exec_or_404(sb: LocalSandbox, exec_id: str) -> ExecProcess:
    ex = sb.execs.get(exec_id)
    if ex is None:
        fail(Status.NOT_FOUND, f"exec {exec_id!r} not found")
    return ex


@finalize_servicer
class Router(TaskCommandRouterBase):
    """The task command router: V2 stdio and every sandbox's ``exec``."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.reg = ctx.registry

    async def SandboxStdioReadV2(
        self, stream: Stream[sr_pb2.SandboxStdioReadV2Request, sr_pb2.SandboxStdioReadV2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        buf = (
            sb.stderr
            if req.file_descriptor == sr_pb2.SANDBOX_STDIO_FILE_DESCRIPTOR_STDERR
            else sb.stdout
        )
        async for start, chunk in buf.follow(req.offset):
            await stream.send_message(
                sr_pb2.SandboxStdioReadV2Response(data=chunk, starting_offset=start)
            )

    async def SandboxStdinWriteV2(
        self, stream: Stream[sr_pb2.SandboxStdinWriteV2Request, sr_pb2.SandboxStdinWriteV2Response]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        await sb.stdin_write_at(req.offset, req.data, req.eof)
        await stream.send_message(sr_pb2.SandboxStdinWriteV2Response())

    async def SandboxWaitUntilReady(
        self,
        stream: Stream[
            sr_pb2.SandboxWaitUntilReadyTcrRequest, sr_pb2.SandboxWaitUntilReadyTcrResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        await stream.send_message(sr_pb2.SandboxWaitUntilReadyTcrResponse(ready_at=sb.created_at))

    async def TaskReloadVolumes(
        self, stream: Stream[sr_pb2.TaskReloadVolumesRequest, sr_pb2.TaskReloadVolumesResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        self.ctx.check_router_task(stream, req.task_id)
        await stream.send_message(
            sr_pb2.TaskReloadVolumesResponse()
        )  # volumes are live directories

    async def TaskExecStart(
        self, stream: Stream[sr_pb2.TaskExecStartRequest, sr_pb2.TaskExecStartResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        if sb.done.is_set():
            fail(
                Status.FAILED_PRECONDITION,
                f"Sandbox {sb.id} has already finished; cannot exec in it",
            )
        if not req.command_args:
            fail(Status.INVALID_ARGUMENT, "exec needs a command")
        env: dict[str, str] = {}
        for sid in req.secret_ids:
            info = self.reg.secrets_by_id.get(sid)
            if info is None:
                fail(Status.NOT_FOUND, f"Secret {sid!r} not found")
            env.update(info.values)
        for src in req.secret_sources:
            if src.secret_id:
                info = self.reg.secrets_by_id.get(src.secret_id)
                if info is None:
                    fail(Status.NOT_FOUND, f"Secret {src.secret_id!r} not found")
                env.update(info.values)
            else:
                env.update(dict(src.env.contents))
        env.update(dict(req.env))
        if req.workdir and not req.workdir.startswith("/"):
            fail(Status.INVALID_ARGUMENT, f"workdir must be absolute, got {req.workdir!r}")
        pipe_out = req.stdout_config == sr_pb2.TASK_EXEC_STDOUT_CONFIG_PIPE
        err_cfg = req.stderr_config
        await sb.exec_start(
            req.exec_id,
            list(req.command_args),
            env=env,
            workdir=req.workdir or None,
            timeout_s=float(req.timeout_secs) if req.timeout_secs else None,
            stdout=pipe_out,
            stderr=err_cfg == sr_pb2.TASK_EXEC_STDERR_CONFIG_PIPE,
            merge_stderr=err_cfg == sr_pb2.TASK_EXEC_STDERR_CONFIG_STDOUT,
        )
        await stream.send_message(sr_pb2.TaskExecStartResponse())

    async def TaskExecPoll(
        self, stream: Stream[sr_pb2.TaskExecPollRequest, sr_pb2.TaskExecPollResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ex = _exec_or_404(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        resp = sr_pb2.TaskExecPollResponse()
        if ex.done.is_set():
            if ex.signal is not None:
                resp.signal = ex.signal
            else:
                resp.code = ex.code if ex.code is not None else -1
        await stream.send_message(resp)

    async def TaskExecWait(
        self, stream: Stream[sr_pb2.TaskExecWaitRequest, sr_pb2.TaskExecWaitResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ex = _exec_or_404(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        await ex.done.wait()
        resp = sr_pb2.TaskExecWaitResponse()
        if ex.signal is not None:
            resp.signal = ex.signal
        else:
            resp.code = ex.code if ex.code is not None else -1
        await stream.send_message(resp)

    async def TaskExecStdioRead(
        self, stream: Stream[sr_pb2.TaskExecStdioReadRequest, sr_pb2.TaskExecStdioReadResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ex = _exec_or_404(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        buf = (
            ex.stderr
            if req.file_descriptor == sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR
            else ex.stdout
        )
        async for _start, chunk in buf.follow(req.offset):
            await stream.send_message(sr_pb2.TaskExecStdioReadResponse(data=chunk))

    async def _after_stdin(self, sb: LocalSandbox, ex: ExecProcess) -> None:
        if ex.fs_command is not None and ex.stdin_closed:
            await sb.run_fs_tool(ex)

    async def TaskExecStdinWrite(
        self, stream: Stream[sr_pb2.TaskExecStdinWriteRequest, sr_pb2.TaskExecStdinWriteResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        ex = _exec_or_404(sb, req.exec_id)
        sb.touch()
        await ex.write_stdin(req.offset, req.data, req.eof)
        await self._after_stdin(sb, ex)
        await stream.send_message(sr_pb2.TaskExecStdinWriteResponse())

    async def TaskExecStdinWriteStream(
        self,
        stream: Stream[
            sr_pb2.TaskExecStdinWriteStreamRequest, sr_pb2.TaskExecStdinWriteStreamResponse
        ],
    ) -> None:
        first = await stream.recv_message()
        if first is None or not first.HasField("start"):
            fail(Status.INVALID_ARGUMENT, "the stdin stream must begin with a start message")
        sb = self.ctx.check_router_task(stream, first.start.task_id)
        ex = _exec_or_404(sb, first.start.exec_id)
        offset = first.start.offset
        async for msg in stream:
            sb.touch()
            if msg.HasField("end"):
                await ex.write_stdin(offset, b"", True)
                break
            await ex.write_stdin(offset, msg.data, False)
            offset += len(msg.data)
        await self._after_stdin(sb, ex)
        await stream.send_message(sr_pb2.TaskExecStdinWriteStreamResponse())

    async def TaskExecStdinStatus(
        self, stream: Stream[sr_pb2.TaskExecStdinStatusRequest, sr_pb2.TaskExecStdinStatusResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ex = _exec_or_404(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        await stream.send_message(
            sr_pb2.TaskExecStdinStatusResponse(
                num_bytes_written=ex.stdin_offset, closed=ex.stdin_closed
            )
        )
