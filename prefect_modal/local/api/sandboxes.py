"""Sandboxes: create, wait, terminate, list, names, tags, V1 logs and stdin."""

from __future__ import annotations

import time
from typing import Any

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..runtime.streams import MAX_CHUNK, OutputBuffer, OutputGone, chunk_end, utf8_safe_end
from .base import Room, fail
from .context import MAX_WAIT_S, log


class Sandboxes(Room):
    """Sandboxes: create, wait, terminate, list, names, tags, V1 logs and stdin."""

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
                tunnels=self.ctx.tunnels.tunnel_data(sb.id),
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
                fail(Status.NOT_FOUND, self.reg.missing("task", req.task_id))
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
            fail(Status.NOT_FOUND, self.reg.missing("task", req.task_id))
        url, jwt = self.ctx.router_access(sb)
        await stream.send_message(api_pb2.TaskGetCommandRouterAccessResponse(url=url, jwt=jwt))

    async def _wait(
        self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        await sb.wait(min(max(req.timeout, 0.0), MAX_WAIT_S))
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
        deadline = time.monotonic() + min(req.timeout or MAX_WAIT_S, MAX_WAIT_S)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await buf.wait_for_more(offset, left):
                return  # no eof: the client reconnects from last_entry_id
            # the output window: V1 logs have no way to say what was dropped (entry ids
            # are opaque to the client), so they go on from the window's start
            offset = max(offset, buf.window_start())
            size = len(buf)
            if size > offset:
                try:
                    window = buf.read(offset, MAX_CHUNK + 1)
                except OutputGone:
                    return  # pruned meanwhile: the client's next call hears NOT_FOUND
                end = chunk_end(window, 0)
                cut = utf8_safe_end(window, 0, end)
                if cut == 0:  # one incomplete character so far
                    if not buf.closed:
                        if not await buf.wait_for_more(
                            size, max(deadline - time.monotonic(), 0.001)
                        ):
                            return
                        continue
                    cut = len(window)
                text = window[:cut].decode("utf-8", errors="replace")
                item = api_pb2.TaskLogs(data=text, file_descriptor=fd, timestamp=time.time())
                offset += cut
                await stream.send_message(
                    api_pb2.TaskLogsBatch(
                        items=[item], entry_id=str(offset), task_id=sb.task_id, sandbox_id=sb.id
                    )
                )
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
