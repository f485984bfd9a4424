"""Apps, environments and the client's hello: what every client call starts with.

Apps as `modal app list|stop` and `modal run` see them: an app made by
``App.lookup`` is deployed under its name; one made by ``AppCreate`` (`modal
run`, ``app.run()``) is ephemeral (or detached) and lives while its client
heartbeats (``modal/runner.py``: ``AppHeartbeat`` every ``heartbeat_interval``,
15 s, ``AppClientDisconnect`` at the end). An app that stops, by `modal app
stop`, a disconnect or missed heartbeats, terminates its running sandboxes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from google.protobuf import empty_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..state import APP_DETACHED, APP_EPHEMERAL, APP_STOPPED, AppInfo
from .base import NAME_RE, Room, fail, log
from .context import IMAGE_BUILDER_VERSION

#: an ephemeral app whose client sent no heartbeat for this long is stopped (the
#: client sends one every 15 s, ``modal/config.py`` ``heartbeat_interval``)
APP_HEARTBEAT_TIMEOUT_S = 60.0


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

    # ----- apps as the CLI sees them ------------------------------------------

    def _app(self, app_id: str) -> AppInfo:
        info = self.reg.app_info.get(app_id)
        if info is None:
            fail(Status.NOT_FOUND, f"App {app_id!r} not found")
        return info

    def _lifecycle(self, info: AppInfo) -> api_pb2.AppLifecycle:
        return api_pb2.AppLifecycle(
            app_state=info.state,  # type: ignore[arg-type]
            created_at=info.created_at,
            stopped_at=info.stopped_at or 0.0,
        )

    def _running_tasks(self, app_id: str) -> int:
        return sum(
            1
            for sb in self.reg.sandboxes.values()
            if sb.spec.app_id == app_id and not sb.done.is_set()
        )

    async def stop_app(self, info: AppInfo) -> None:
        """Stop ``info`` and terminate its running sandboxes (Modal: stopping an app
        stops its containers)."""
        running = self.reg.stop_app(info)
        if running:
            await asyncio.gather(*(sb.terminate() for sb in running), return_exceptions=True)
            await self.reg.flushed()

    async def AppCreate(
        self, stream: Stream[api_pb2.AppCreateRequest, api_pb2.AppCreateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        state = req.app_state or APP_EPHEMERAL
        info = self.reg.new_app(
            req.description, req.environment_name, state, heartbeat=time.monotonic()
        )
        self.ctx.spawn_background(self._watch_heartbeats(info))
        await stream.send_message(
            api_pb2.AppCreateResponse(app_id=info.id, app_page_url="", app_logs_url="")
        )

    async def _watch_heartbeats(self, info: AppInfo) -> None:
        """Stop an ephemeral app once its client stops heartbeating (a detached one
        outlives its client, as `modal run --detach` does on Modal)."""
        while info.state != APP_STOPPED and info.heartbeat is not None:
            left = info.heartbeat + APP_HEARTBEAT_TIMEOUT_S - time.monotonic()
            if left <= 0:
                if info.state == APP_EPHEMERAL:
                    log.info(
                        "app %s: no heartbeat for %gs, stopping it",
                        info.id,
                        APP_HEARTBEAT_TIMEOUT_S,
                    )
                    await self.stop_app(info)
                return
            await asyncio.sleep(left)

    async def AppPublish(
        self, stream: Stream[api_pb2.AppPublishRequest, api_pb2.AppPublishResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        info = self._app(req.app_id)
        if req.function_ids or req.class_ids:
            from .base import FUNCTIONS_NOT_SERVED

            fail(Status.UNIMPLEMENTED, FUNCTIONS_NOT_SERVED)
        if req.app_state:
            info.state = req.app_state
        if req.name:  # a deployment: the name now leads to this app
            info.name = req.name
            self.reg.apps[(info.environment, req.name)] = info.id
            self.reg.app_names[info.id] = req.name
        await stream.send_message(api_pb2.AppPublishResponse(url="", deployed_at=time.time()))

    async def AppHeartbeat(self, stream: Stream[api_pb2.AppHeartbeatRequest, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        info = self._app(req.app_id)
        if info.heartbeat is not None:
            info.heartbeat = time.monotonic()
        await stream.send_message(empty_pb2.Empty())

    async def AppClientDisconnect(
        self, stream: Stream[api_pb2.AppClientDisconnectRequest, Any]
    ) -> None:
        """The client of `modal run` is done: an ephemeral app stops with it."""
        req = await stream.recv_message()
        assert req is not None
        info = self._app(req.app_id)
        if info.state == APP_EPHEMERAL:
            await self.stop_app(info)
        elif info.state == APP_DETACHED:
            info.heartbeat = None  # it lives on without its client
        await stream.send_message(empty_pb2.Empty())

    async def AppList(
        self, stream: Stream[api_pb2.AppListRequest, api_pb2.AppListResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        env = req.environment_name or "main"
        items = [
            api_pb2.AppListResponse.AppListItem(
                app_id=a.id,
                description=a.name,
                name=a.name,
                state=a.state,  # type: ignore[arg-type]
                created_at=a.created_at,
                stopped_at=a.stopped_at or 0.0,
                n_running_tasks=self._running_tasks(a.id),
            )
            for a in self.reg.app_info.values()
            if a.environment in (env, "") or not req.environment_name
        ]
        await stream.send_message(api_pb2.AppListResponse(apps=items))

    async def AppGetByDeploymentName(
        self,
        stream: Stream[
            api_pb2.AppGetByDeploymentNameRequest, api_pb2.AppGetByDeploymentNameResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        env = req.environment_name or "main"
        resp = api_pb2.AppGetByDeploymentNameResponse(environment_name=env)
        app_id = self.reg.apps.get((env, req.name))
        if app_id is not None:
            resp.app_id = app_id
            resp.lifecycle.CopyFrom(self._lifecycle(self.reg.app_info[app_id]))
        else:  # recently stopped under that name: the CLI says "already stopped"
            stopped = [
                a
                for a in self.reg.app_info.values()
                if a.name == req.name and a.environment == env and a.state == APP_STOPPED
            ]
            if stopped:
                last = max(stopped, key=lambda a: a.stopped_at or 0.0)
                resp.previous_app_id = last.id
                resp.lifecycle.CopyFrom(self._lifecycle(last))
        await stream.send_message(resp)

    async def AppGetLifecycle(
        self, stream: Stream[api_pb2.AppGetLifecycleRequest, api_pb2.AppGetLifecycleResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        info = self._app(req.app_id)
        await stream.send_message(api_pb2.AppGetLifecycleResponse(lifecycle=self._lifecycle(info)))

    async def AppStop(self, stream: Stream[api_pb2.AppStopRequest, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self.stop_app(self._app(req.app_id))
        await stream.send_message(empty_pb2.Empty())

    async def AppGetLogs(
        self, stream: Stream[api_pb2.AppGetLogsRequest, api_pb2.TaskLogsBatch]
    ) -> None:
        """The live log stream `modal run` follows: the local server has no Function
        logs to stream, so it only says when the app is done (``app_done``), once it
        stops, or ends an empty stream after the request's timeout (the client asks
        again, ``modal/_output/pty.py``)."""
        req = await stream.recv_message()
        assert req is not None
        info = self.reg.app_info.get(req.app_id)
        deadline = time.monotonic() + min(max(req.timeout, 0.0), 55.0)
        while info is not None and info.state != APP_STOPPED and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        if info is None or info.state == APP_STOPPED:
            await stream.send_message(api_pb2.TaskLogsBatch(app_done=True))
