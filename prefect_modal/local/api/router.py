"""The task command router: V2 stdio, readiness, volume reloads and every ``exec``."""

from __future__ import annotations

import asyncio

from grpclib import Status
from grpclib.server import Stream
from modal_proto import task_command_router_pb2 as sr_pb2

from ..runtime.sandbox import ExecProcess, LocalSandbox
from . import filesystem
from .base import Room, fail
from .tunnels import wait_ready

#: how long a wait for a timed-out exec is held before DEADLINE_EXCEEDED (see TaskExecWait)
EXEC_TIMEOUT_HOLD_S = 30.0


class CommandRouter(Room):
    """The task command router: V2 stdio, readiness, volume reloads and every ``exec``."""

    def _exec(self, sb: LocalSandbox, exec_id: str) -> ExecProcess:
        ex = sb.execs.get(exec_id)
        if ex is None:
            retention = self.reg.retention_s
            hint = f" (finished execs are pruned after {retention:g} s)" if retention else ""
            fail(Status.NOT_FOUND, f"exec {exec_id!r} not found{hint}")
        return ex

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
        ready_at = await wait_ready(self.ctx, sb, req.timeout)
        await stream.send_message(sr_pb2.SandboxWaitUntilReadyTcrResponse(ready_at=ready_at))

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
        args = list(req.command_args)
        if filesystem.is_fs_tools(args):
            ex = sb.add_exec(req.exec_id)
            if ex is not None:
                await filesystem.start(sb, ex, args)
            await stream.send_message(sr_pb2.TaskExecStartResponse())
            return
        pipe_out = req.stdout_config == sr_pb2.TASK_EXEC_STDOUT_CONFIG_PIPE
        err_cfg = req.stderr_config
        pty_size: tuple[int, int] | None = None
        if req.HasField("pty_info") and req.pty_info.enabled:
            # `modal container exec --pty`, `modal shell`, exec(pty=True): a real terminal
            # (modal/sandbox/_sandbox.py `_container_exec` sends pty_info)
            if sb.isolation is None:
                fail(
                    Status.FAILED_PRECONDITION,
                    "exec with a pty needs an isolated sandbox, and this local server cannot "
                    f"isolate sandboxes ({self.ctx.not_isolated_because})",
                )
            info = req.pty_info
            pty_size = (info.winsz_rows, info.winsz_cols)
            env.setdefault("TERM", info.env_term or "xterm")
            if info.env_colorterm:
                env.setdefault("COLORTERM", info.env_colorterm)
            if info.env_term_program:
                env.setdefault("TERM_PROGRAM", info.env_term_program)
        await sb.exec_start(
            req.exec_id,
            args,
            env=env,
            workdir=req.workdir or None,
            timeout_s=float(req.timeout_secs) if req.timeout_secs else None,
            stdout=pipe_out,
            stderr=err_cfg == sr_pb2.TASK_EXEC_STDERR_CONFIG_PIPE,
            merge_stderr=err_cfg == sr_pb2.TASK_EXEC_STDERR_CONFIG_STDOUT,
            pty_size=pty_size,
        )
        await stream.send_message(sr_pb2.TaskExecStartResponse())

    async def TaskExecPoll(
        self, stream: Stream[sr_pb2.TaskExecPollRequest, sr_pb2.TaskExecPollResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        ex = self._exec(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        resp = sr_pb2.TaskExecPollResponse()
        if ex.done.is_set() and not ex.timed_out:  # a timed-out exec: see TaskExecWait
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
        ex = self._exec(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        await ex.done.wait()
        if ex.timed_out:
            # Modal's client turns an exec whose ``timeout`` passed into returncode -1
            # from its own deadline (modal/container_process.py, ContainerProcess.wait:
            # ExecTimeoutError -> -1), which starts after TaskExecStart returns, so it
            # passes just after this server killed the command. Answering with the
            # kill's signal would give 137; so no exit status is sent: the wait is held
            # until the client's deadline cancels it (bounded: then DEADLINE_EXCEEDED,
            # which the client retries until its deadline).
            await asyncio.sleep(EXEC_TIMEOUT_HOLD_S)
            fail(Status.DEADLINE_EXCEEDED, f"exec {req.exec_id!r} timed out")
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
        ex = self._exec(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        buf = (
            ex.stderr
            if req.file_descriptor == sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR
            else ex.stdout
        )
        async for _start, chunk in buf.follow(req.offset):
            await stream.send_message(sr_pb2.TaskExecStdioReadResponse(data=chunk))

    async def _after_stdin(self, sb: LocalSandbox, ex: ExecProcess) -> None:
        if ex.fs_command is not None and ex.stdin_closed:
            await filesystem.answer(sb, ex)

    async def TaskExecStdinWrite(
        self, stream: Stream[sr_pb2.TaskExecStdinWriteRequest, sr_pb2.TaskExecStdinWriteResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.check_router_task(stream, req.task_id)
        ex = self._exec(sb, req.exec_id)
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
        ex = self._exec(sb, first.start.exec_id)
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
        ex = self._exec(self.ctx.check_router_task(stream, req.task_id), req.exec_id)
        await stream.send_message(
            sr_pb2.TaskExecStdinStatusResponse(
                num_bytes_written=ex.stdin_offset, closed=ex.stdin_closed
            )
        )
