"""Every sandbox's tunnels and the server's connect-token proxy, and their lifetime.

For each port a sandbox opens (``encrypted_ports``, ``h2_ports``,
``unencrypted_ports``) the server starts a TLS relay, as Modal gives every
port an ``https://`` endpoint (``h2_ports`` advertise HTTP/2 by ALPN and pass
the bytes on unchanged, as Modal's H2 tunnels do); an unencrypted port also
gets a plain TCP relay (``Tunnel.tcp_socket``). All of them end when the
sandbox finishes, and so do its connect tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modal_proto import api_pb2

from . import tls
from .connect_proxy import ConnectProxy, Grant
from .relay import Network, Relay

if TYPE_CHECKING:
    from .sandbox import LocalSandbox

log = logging.getLogger("prefect_modal.local")


@dataclass
class SandboxTunnels:
    data: list[api_pb2.TunnelData] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    allow: list[Network] = field(default_factory=list)


class TunnelManager:
    """Opens tunnels at sandbox creation and closes them when the sandbox finishes."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir
        self.host = "::1" if host == "::1" else "127.0.0.1"
        self._by_sandbox: dict[str, SandboxTunnels] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._proxy: ConnectProxy | None = None
        self._proxy_lock = asyncio.Lock()
        self._closed = False
        self._ssl: dict[bool, ssl.SSLContext] = {}

    def _ssl_context(self, h2: bool) -> ssl.SSLContext:
        """One TLS context per ALPN choice for the server's life (loading it costs ~10 ms)."""
        ctx = self._ssl.get(h2)
        if ctx is None:
            alpn = ["h2", "http/1.1"] if h2 else ["http/1.1"]
            ctx = self._ssl[h2] = tls.server_context(self.state_dir, alpn=alpn)
        return ctx

    @property
    def cert_file(self) -> Path:
        return tls.ensure_certificate(self.state_dir)

    def _public_host(self) -> str:
        return "[::1]" if self.host == "::1" else self.host

    async def open(
        self, sb: LocalSandbox, ports: list[api_pb2.PortSpec], allow: list[Network]
    ) -> None:
        """Start a relay per port (validated by the caller) and watch the sandbox's end."""
        if not (ports or allow) or self._closed:
            return
        entry = SandboxTunnels(allow=list(allow))
        self._by_sandbox[sb.id] = entry
        try:
            for spec in ports:
                h2 = spec.tunnel_type == api_pb2.TUNNEL_TYPE_H2
                ctx = self._ssl_context(h2)
                secure = Relay(
                    sb.open_connection, spec.port, host=self.host, ssl_context=ctx, allow=allow
                )
                entry.relays.append(secure)
                data = api_pb2.TunnelData(
                    host=self._public_host(), port=await secure.start(), container_port=spec.port
                )
                if spec.unencrypted:
                    plain = Relay(
                        sb.open_connection,
                        spec.port,
                        host=self.host,
                        ssl_context=None,
                        allow=allow,
                    )
                    entry.relays.append(plain)
                    data.unencrypted_host = self._public_host()
                    data.unencrypted_port = await plain.start()
                entry.data.append(data)
        except BaseException:
            await self._close_sandbox(sb.id)
            raise
        self._watch(sb)

    def _watch(self, sb: LocalSandbox) -> None:
        async def watcher() -> None:
            await sb.done.wait()
            await self._close_sandbox(sb.id)

        task = asyncio.ensure_future(watcher())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _close_sandbox(self, sandbox_id: str) -> None:
        entry = self._by_sandbox.pop(sandbox_id, None)
        if self._proxy is not None:
            self._proxy.revoke_sandbox(sandbox_id)
        if entry is not None:
            await asyncio.gather(*(r.close() for r in entry.relays), return_exceptions=True)

    def inbound_allow(self, sandbox_id: str) -> list[Network]:
        entry = self._by_sandbox.get(sandbox_id)
        return list(entry.allow) if entry else []

    def tunnel_data(self, sandbox_id: str) -> list[api_pb2.TunnelData]:
        entry = self._by_sandbox.get(sandbox_id)
        return list(entry.data) if entry else []

    async def connect_token(
        self,
        sb: LocalSandbox,
        port: int,
        user_metadata: str | None,
        allow: list[Network],
    ) -> tuple[str, str]:
        """A token for ``port`` of ``sb`` and the URL that accepts it."""
        async with self._proxy_lock:
            if self._proxy is None:
                proxy = ConnectProxy(
                    host=self.host,
                    ssl_context=self._ssl_context(False),
                )
                await proxy.start()
                self._proxy = proxy
        proxy = self._proxy
        token = proxy.grant(
            Grant(
                sandbox_id=sb.id,
                port=port,
                user_metadata=user_metadata,
                connect=sb.open_connection,
                allow=tuple(allow),
            )
        )
        if sb.id not in self._by_sandbox:
            self._by_sandbox[sb.id] = SandboxTunnels()
            self._watch(sb)
        return f"https://{self._public_host()}:{proxy.port}", token

    async def close_all(self) -> None:
        """Server shutdown: every listener and connection goes."""
        self._closed = True
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(
            *(self._close_sandbox(sid) for sid in list(self._by_sandbox)), return_exceptions=True
        )
        if self._proxy is not None:
            with contextlib.suppress(Exception):
                await self._proxy.close()
            self._proxy = None
