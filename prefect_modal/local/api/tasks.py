"""Containers as `modal container list|logs|stop` see them: each sandbox is a task.

On Modal every sandbox runs in one container, a task (``ta-...``); the CLI
lists running tasks (``TaskList``), reads one's times (``TaskGetInfo``), stops
one (``ContainerStop``) and fetches its logs (``AppFetchLogs``, by task or
sandbox id, a time range and a tail ``limit``: ``modal/_logs.py``).

A difference: the local server keeps output as bytes, without the time each
line was written, so a fetched log line carries the time its sandbox started;
a time range selects the sandboxes that ran in it, and ``limit`` the last
lines.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import timestamp_pb2
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..runtime.sandbox import LocalSandbox
from ..runtime.streams import OutputGone
from .base import Room, fail

#: the most log lines one AppFetchLogs answers (the client's own cap, ``_FETCH_LIMIT``)
FETCH_LIMIT = 10_000
_FDS = (api_pb2.FILE_DESCRIPTOR_STDOUT, api_pb2.FILE_DESCRIPTOR_STDERR)


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


class Tasks(Room):
    """Containers as `modal container list|logs|stop` see them: each sandbox is a task."""

    def _task(self, task_id: str) -> LocalSandbox:
        sb = self.reg.by_task.get(task_id)
        if sb is None:
            fail(Status.NOT_FOUND, self.reg.missing("Container", task_id))
        return sb

    async def TaskList(
        self, stream: Stream[api_pb2.TaskListRequest, api_pb2.TaskListResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        tasks = [
            api_pb2.TaskStats(
                task_id=sb.task_id,
                app_id=sb.spec.app_id,
                app_description=sb.spec.app_name or "",
                started_at=sb.created_at,
                enqueued_at=sb.created_at,
            )
            for sb in self.reg.sandboxes.values()
            if not sb.done.is_set() and (not req.app_id or sb.spec.app_id == req.app_id)
        ]
        await stream.send_message(api_pb2.TaskListResponse(tasks=tasks))

    async def TaskGetInfo(
        self, stream: Stream[api_pb2.TaskGetInfoRequest, api_pb2.TaskGetInfoResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self._task(req.task_id)
        info = api_pb2.TaskInfo(
            id=sb.task_id,
            sandbox_id=sb.id,
            enqueued_at=sb.created_at,
            started_at=sb.created_at,
            finished_at=sb.finished_at or 0.0,
        )
        res = sb.result()
        if res is not None:
            info.result.CopyFrom(res)
        await stream.send_message(api_pb2.TaskGetInfoResponse(app_id=sb.spec.app_id, info=info))

    async def ContainerStop(self, stream: Stream[api_pb2.ContainerStopRequest, Any]) -> None:
        """`modal container stop`: the sandbox ends as terminated (exit 137)."""
        req = await stream.recv_message()
        assert req is not None
        sb = self._task(req.task_id)
        await sb.terminate()
        await self.reg.flushed()
        await stream.send_message(api_pb2.ContainerStopResponse())

    async def AppFetchLogs(
        self, stream: Stream[api_pb2.AppFetchLogsRequest, api_pb2.AppFetchLogsResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        since = _seconds(req.since) if req.HasField("since") else 0.0
        until = _seconds(req.until) if req.HasField("until") else time.time()
        limit = min(req.limit or FETCH_LIMIT, FETCH_LIMIT)
        fds = [req.source] if req.source in _FDS else list(_FDS)
        batches: list[api_pb2.TaskLogsBatch] = []
        for sb in self.reg.sandboxes.values():
            if req.app_id and sb.spec.app_id != req.app_id:
                continue
            if req.task_id and sb.task_id != req.task_id:
                continue
            if req.sandbox_id and sb.id != req.sandbox_id:
                continue
            if sb.created_at > until or (sb.finished_at or time.time()) < since:
                continue
            items = []
            for fd in fds:
                buf = sb.stdout if fd == api_pb2.FILE_DESCRIPTOR_STDOUT else sb.stderr
                try:
                    data = buf.read(0, len(buf))
                except OutputGone:
                    continue
                text = data.decode("utf-8", errors="replace")
                if req.search_text:
                    lines = [ln for ln in text.splitlines(True) if req.search_text in ln]
                else:
                    lines = text.splitlines(True)
                items += [
                    api_pb2.TaskLogs(data=ln, file_descriptor=fd, timestamp=sb.created_at)
                    for ln in lines
                ]
            if items:
                batches.append(
                    api_pb2.TaskLogsBatch(
                        items=items[-limit:], task_id=sb.task_id, sandbox_id=sb.id
                    )
                )
        await stream.send_message(api_pb2.AppFetchLogsResponse(batches=batches))
