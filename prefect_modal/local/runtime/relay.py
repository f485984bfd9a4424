"""Relays: listeners on the host's loopback that forward each connection into a sandbox.

A tunnel is a `Relay`: it accepts on its own host's port 443 (`tunnel_hosts`),
TLS-terminated with that host's certificate, or on a free port for the plain
TCP side of an unencrypted port,
and copies bytes both ways to the sandbox's port. It reaches the sandbox only
through the `Connector` it is given (``LocalSandbox.open_connection``), so how
a sandbox's network is reached is decided in one place. Closing a relay closes
its listener and every connection it carries: tunnels end with their sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger("prefect_modal.local")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[int], Awaitable[Streams]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_CHUNK = 1 << 16
_CONNECT_TIMEOUT_S = 10.0


def peer_allowed(writer: asyncio.StreamWriter, allow: Sequence[Network]) -> bool:
    """``inbound_cidr_allowlist``: an empty list allows everyone, as on Modal."""
    if not allow:
        return True
    peer = writer.get_extra_info("peername")
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    return any(ip in net for net in allow)


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    # pass the end on: half-close where the transport can, else close (TLS cannot half-close)
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        if dst.can_write_eof():
            dst.write_eof()
        else:
            dst.close()


async def pipe(a: Streams, b: Streams) -> None:
    """Copy both ways until both directions ended, then close both ends."""
    try:
        await asyncio.gather(_copy(a[0], b[1]), _copy(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


class Listener:
    """A loopback listener whose connection handlers are tracked, so `close` ends them all."""

    def __init__(self, host: str, ssl_context: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = 0
        self._ssl = ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, sock: socket.socket | None = None) -> int:
        """Listen on ``sock`` (bound already, e.g. to a tunnel's own host on port 443),
        else on a free port of ``host``; returns the port."""
        where: dict[str, Any] = (
            {"sock": sock} if sock is not None else {"host": self.host, "port": 0}
        )
        if self._ssl is not None:
            self._server = await asyncio.start_server(
                self._accept, ssl=self._ssl, ssl_handshake_timeout=10.0, **where
            )
        else:
            self._server = await asyncio.start_server(self._accept, **where)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closed or task is None:
            await close_writer(writer)
            return
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.handle(reader, writer)
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            await close_writer(writer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop listening and end every connection in flight."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


class Relay(Listener):
    """One tunnel: every accepted connection is piped to ``target_port`` in the sandbox."""

    def __init__(
        self,
        connect: Connector,
        target_port: int,
        *,
        host: str,
        ssl_context: ssl.SSLContext | None,
        allow: Sequence[Network] = (),
    ) -> None:
        super().__init__(host, ssl_context)
        self._connect = connect
        self.target_port = target_port
        self._allow = list(allow)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not peer_allowed(writer, self._allow):
            return
        try:
            upstream = await asyncio.wait_for(self._connect(self.target_port), _CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            return  # nothing listens on the sandbox's port (yet): the client sees a close
        await pipe((reader, writer), upstream)
