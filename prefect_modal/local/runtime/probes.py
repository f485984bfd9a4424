"""Readiness probes: run by the server from a sandbox's start until the probe first passes.

``Probe.with_tcp(port)`` passes when a connection to the sandbox's port opens
(through ``LocalSandbox.open_connection``, as a tunnel would reach it);
``Probe.with_exec(*argv)`` passes when the command, run in the sandbox as
``sb.exec`` runs it, exits 0. Attempts repeat every ``interval_ms``; the probe
stops when it passes or the sandbox finishes. ``wait_until_ready`` waits on
the outcome (see `api.router`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING

from modal_proto import api_pb2

from .relay import close_writer

if TYPE_CHECKING:
    from .sandbox import LocalSandbox

_TCP_ATTEMPT_TIMEOUT_S = 2.0
_EXEC_ATTEMPT_TIMEOUT_S = 30.0


def describe(probe: api_pb2.Probe) -> str:
    if probe.HasField("exec_command"):
        return f"exec {list(probe.exec_command.argv)!r}"
    return f"tcp port {probe.tcp_port}"


class Readiness:
    """One sandbox's probe: the task that runs it and its outcome."""

    def __init__(self, sb: LocalSandbox, probe: api_pb2.Probe) -> None:
        self.sb = sb
        self.probe = probe
        self.ready = asyncio.Event()
        self.ready_at: float | None = None
        self.attempts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        interval = max(self.probe.interval_ms, 1) / 1000.0
        done_wait = asyncio.ensure_future(self.sb.done.wait())
        try:
            while not self.sb.done.is_set():
                self.attempts += 1
                if await self._attempt():
                    if not self.sb.done.is_set():
                        self.ready_at = time.time()
                        self.ready.set()
                    return
                await asyncio.wait({done_wait}, timeout=interval)
        finally:
            done_wait.cancel()

    async def _attempt(self) -> bool:
        if self.probe.HasField("exec_command"):
            return await self._attempt_exec()
        return await self._attempt_tcp()

    async def _attempt_tcp(self) -> bool:
        try:
            _reader, writer = await asyncio.wait_for(
                self.sb.open_connection(self.probe.tcp_port), _TCP_ATTEMPT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError):
            return False
        await close_writer(writer)
        return True

    async def _attempt_exec(self) -> bool:
        exec_id = f"probe-{uuid.uuid4().hex[:12]}"
        ex = await self.sb.exec_start(
            exec_id,
            list(self.probe.exec_command.argv),
            env={},
            workdir=None,
            timeout_s=_EXEC_ATTEMPT_TIMEOUT_S,
            stdout=False,
            stderr=False,
        )
        try:
            await ex.done.wait()
        finally:
            self.sb.execs.pop(exec_id, None)  # probe runs are not the user's execs
        return ex.code == 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class ProbeRunner:
    """The server's probes, by sandbox id, for as long as the sandbox runs."""

    def __init__(self) -> None:
        self._by_sandbox: dict[str, Readiness] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def start(self, sb: LocalSandbox, probe: api_pb2.Probe) -> Readiness:
        r = Readiness(sb, probe)
        self._by_sandbox[sb.id] = r
        r.start()

        async def forget() -> None:
            await sb.done.wait()
            await r.stop()
            self._by_sandbox.pop(sb.id, None)

        task = asyncio.ensure_future(forget())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return r

    def get(self, sandbox_id: str) -> Readiness | None:
        return self._by_sandbox.get(sandbox_id)

    async def close_all(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*(r.stop() for r in self._by_sandbox.values()), return_exceptions=True)
        self._by_sandbox.clear()
