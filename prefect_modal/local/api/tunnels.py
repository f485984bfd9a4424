"""How the outside reaches a sandbox: tunnels, connect tokens, and readiness.

Tunnels are opened with the sandbox (`runtime.tunnels`), so ``sb.tunnels()``
is answered at once, whatever its ``timeout``; a finished sandbox has none.
``wait_until_ready`` is answered the way Modal's worker answers it: the
probe's pass time; ``DEADLINE_EXCEEDED`` after ``timeout`` (the client raises
``modal.exception.TimeoutError``); ``FAILED_PRECONDITION`` (``ConflictError``)
for a sandbox without a probe or one that finished.
"""

from __future__ import annotations

import asyncio

from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from ..runtime.probes import describe
from ..runtime.sandbox import LocalSandbox
from .base import Room, fail
from .context import ServerContext

NO_PROBE_MESSAGE = "Sandbox does not have a readiness probe configured"


async def wait_ready(ctx: ServerContext, sb: LocalSandbox, timeout: float) -> float:
    """When the sandbox's readiness probe passed; raises the status the client expects."""
    readiness = ctx.probes.get(sb.id)
    if sb.done.is_set():
        fail(
            Status.FAILED_PRECONDITION,
            f"Sandbox {sb.id} has already finished (exit code {sb.returncode})",
        )
    if readiness is None:
        fail(Status.FAILED_PRECONDITION, NO_PROBE_MESSAGE)
    if not readiness.ready.is_set():
        ready = asyncio.ensure_future(readiness.ready.wait())
        done = asyncio.ensure_future(sb.done.wait())
        try:
            await asyncio.wait(
                {ready, done}, timeout=max(timeout, 0.0), return_when="FIRST_COMPLETED"
            )
        finally:
            ready.cancel()
            done.cancel()
    if readiness.ready_at is not None:
        return readiness.ready_at
    if sb.done.is_set():
        fail(
            Status.FAILED_PRECONDITION,
            f"Sandbox {sb.id} finished (exit code {sb.returncode}) before its readiness probe "
            f"({describe(readiness.probe)}) passed",
        )
    fail(
        Status.DEADLINE_EXCEEDED,
        f"Timed out waiting for sandbox to become ready: readiness probe "
        f"({describe(readiness.probe)}) did not pass within {timeout:g}s",
    )


class Tunnels(Room):
    """``sb.tunnels()``, ``sb.create_connect_token()`` and the control plane's readiness wait."""

    async def _tunnels(
        self, stream: Stream[api_pb2.SandboxGetTunnelsRequest, api_pb2.SandboxGetTunnelsResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        resp = api_pb2.SandboxGetTunnelsResponse(tunnels=self.ctx.tunnels.tunnel_data(sb.id))
        res = sb.result()
        if res is not None:
            resp.result.CopyFrom(res)
        await stream.send_message(resp)

    async def SandboxGetTunnels(
        self, stream: Stream[api_pb2.SandboxGetTunnelsRequest, api_pb2.SandboxGetTunnelsResponse]
    ) -> None:
        await self._tunnels(stream)

    async def SandboxGetTunnelsV2(
        self, stream: Stream[api_pb2.SandboxGetTunnelsRequest, api_pb2.SandboxGetTunnelsResponse]
    ) -> None:
        await self._tunnels(stream)

    async def _connect_token(
        self,
        stream: Stream[
            api_pb2.SandboxCreateConnectTokenRequest, api_pb2.SandboxCreateConnectTokenResponse
        ],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        port = req.port or 8080
        if not 1 <= port <= 65535:
            fail(Status.INVALID_ARGUMENT, f"port {port} is out of range; ports are 1 to 65535")
        if sb.done.is_set():
            fail(
                Status.FAILED_PRECONDITION,
                f"Sandbox {sb.id} has already finished; cannot create a connect token for it",
            )
        # inbound_cidr_allowlist covers connect tokens too (kept from the sandbox's creation)
        url, token = await self.ctx.tunnels.connect_token(
            sb,
            port,
            req.user_metadata or None,
            self.ctx.tunnels.inbound_allow(sb.id),
        )
        await stream.send_message(api_pb2.SandboxCreateConnectTokenResponse(url=url, token=token))

    async def SandboxCreateConnectToken(
        self,
        stream: Stream[
            api_pb2.SandboxCreateConnectTokenRequest, api_pb2.SandboxCreateConnectTokenResponse
        ],
    ) -> None:
        await self._connect_token(stream)

    async def SandboxCreateConnectTokenV2(
        self,
        stream: Stream[
            api_pb2.SandboxCreateConnectTokenRequest, api_pb2.SandboxCreateConnectTokenResponse
        ],
    ) -> None:
        await self._connect_token(stream)

    async def SandboxWaitUntilReady(
        self,
        stream: Stream[api_pb2.SandboxWaitUntilReadyRequest, api_pb2.SandboxWaitUntilReadyResponse],
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        sb = self.ctx.sandbox(req.sandbox_id)
        ready_at = await wait_ready(self.ctx, sb, req.timeout)
        await stream.send_message(api_pb2.SandboxWaitUntilReadyResponse(ready_at=ready_at))
