"""Every sandbox's tunnels and the server's connect-token proxy, and their lifetime.

For each port a sandbox opens (``encrypted_ports``, ``h2_ports``,
``unencrypted_ports``) the server starts a TLS relay on a host of its own, port
443, with a certificate of the server's CA, as Modal gives every port an
``https://<host>`` endpoint (``h2_ports`` advertise HTTP/2 by ALPN and pass
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

from . import tls, tunnel_hosts
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
    hosts: list[str] = field(default_factory=list)


class TunnelManager:
    """Opens tunnels at sandbox creation and closes them when the sandbox finishes.

    Each tunnel (and the connect-token proxy) gets a host of its own on port 443
    (`tunnel_hosts`) and a certificate for it signed by the state directory's CA
    (`tls`); a host is free again once its sandbox ends.
    """

    def __init__(self, state_dir: Path, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir
        self.host = "::1" if host == "::1" else "127.0.0.1"
        self._by_sandbox: dict[str, SandboxTunnels] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._proxy: ConnectProxy | None = None
        self._proxy_host: str | None = None
        self._proxy_lock = asyncio.Lock()
        self._closed = False
        self._ssl: dict[tuple[str, bool], ssl.SSLContext] = {}
        self._in_use: set[str] = set()
        self._warned = False

    def _ssl_context(self, host: str, h2: bool) -> ssl.SSLContext:
        """A host's TLS context, kept while the host is in use (loading one costs ~10 ms)."""
        ctx = self._ssl.get((host, h2))
        if ctx is None:
            alpn = ["h2", "http/1.1"] if h2 else ["http/1.1"]
            ctx = self._ssl[host, h2] = tls.server_context(self.state_dir, host, alpn=alpn)
        return ctx

    @property
    def ca_file(self) -> Path:
        return tls.ensure_ca(self.state_dir)

    def _known_hosts(self) -> list[str]:
        """Hosts the state directory has certificates for: reused first."""
        d = self.state_dir / "tls" / "hosts"
        try:
            return sorted(p.stem for p in d.glob("127.*.pem") if not p.stem.endswith("-key"))
        except OSError:
            return []

    def _bind(self) -> tunnel_hosts.BoundHost:
        bound = tunnel_hosts.bind_tunnel_host(
            self.host, in_use=self._in_use, known=self._known_hosts()
        )
        self._in_use.add(bound.host)
        if bound.fallback and not self._warned:
            self._warned = True
            log.warning(
                "local Modal server: tunnels listen on high ports, not 443 as on Modal: %s",
                bound.fallback,
            )
        return bound

    def _release(self, host: str) -> None:
        self._in_use.discard(host)
        for h2 in (False, True):
            self._ssl.pop((host, h2), None)

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
                bound = self._bind()
                entry.hosts.append(bound.host)
                try:
                    ctx = self._ssl_context(bound.host, h2)
                except BaseException:
                    bound.sock.close()
                    raise
                secure = Relay(
                    sb.open_connection, spec.port, host=bound.host, ssl_context=ctx, allow=allow
                )
                entry.relays.append(secure)
                data = api_pb2.TunnelData(
                    host=bound.public_host,
                    port=await secure.start(bound.sock),
                    container_port=spec.port,
                )
                if bound.fallback:
                    sb.stderr.append(
                        f"[prefect-modal local] the tunnel of port {spec.port} is "
                        f"https://{bound.public_host}:{bound.port}, not port 443 as on Modal: "
                        f"{bound.fallback}\n".encode()
                    )
                if spec.unencrypted:
                    # Modal's plain TCP side is "on a random port number" (modal.forward's docs)
                    plain = Relay(
                        sb.open_connection,
                        spec.port,
                        host=bound.host,
                        ssl_context=None,
                        allow=allow,
                    )
                    entry.relays.append(plain)
                    data.unencrypted_host = bound.public_host
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
            for host in entry.hosts:
                self._release(host)

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
                bound = self._bind()
                try:
                    proxy = ConnectProxy(
                        host=bound.host, ssl_context=self._ssl_context(bound.host, False)
                    )
                    await proxy.start(bound.sock)
                except BaseException:
                    bound.sock.close()
                    self._release(bound.host)
                    raise
                self._proxy = proxy
                self._proxy_host = bound.public_host
                if bound.fallback:
                    sb.stderr.append(
                        f"[prefect-modal local] connect tokens are served on "
                        f"https://{bound.public_host}:{bound.port}, not port 443 as on "
                        f"Modal: {bound.fallback}\n".encode()
                    )
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
        url = f"https://{self._proxy_host}"
        return (url if proxy.port == tunnel_hosts.TUNNEL_PORT else f"{url}:{proxy.port}"), token

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
