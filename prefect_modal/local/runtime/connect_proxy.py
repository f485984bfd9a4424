"""Sandbox connect tokens: an authenticating HTTP(S) proxy in front of sandbox ports.

``sb.create_connect_token(user_metadata, port)`` gives a URL and a token; as on
Modal, a request carrying the token (``Authorization: Bearer <token>`` or the
``_modal_connect_token`` query parameter) reaches the sandbox's ``port`` with
an ``X-Verified-User-Data`` header holding the metadata, which the client
cannot spoof (any header of that name it sends is dropped), and without the
token. Requests without a valid token get ``401``.

One TLS listener per server (started with the first token) serves every
token; the token decides the sandbox and port. Each connection is checked on
its first request and then piped; a plain request is sent upstream with
``Connection: close`` so that every further request arrives on a new,
checked connection, while a WebSocket upgrade stays open after its check.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .relay import Connector, Listener, Network, close_writer, peer_allowed, pipe

TOKEN_PARAM = "_modal_connect_token"
VERIFIED_HEADER = "x-verified-user-data"
_MAX_HEAD = 64 * 1024
_HEAD_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Grant:
    """What one token allows: a port of one sandbox, with the metadata to forward."""

    sandbox_id: str
    port: int
    user_metadata: str | None
    connect: Connector
    allow: tuple[Network, ...]


def _response(status: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _take_token(target: str, headers: list[tuple[str, str]]) -> tuple[str | None, str]:
    """The token (header first, then query) and the target without the token parameter."""
    token = None
    for name, value in headers:
        if name.lower() == "authorization" and value.strip().lower().startswith("bearer "):
            token = value.strip()[7:].strip()
    parts = urlsplit(target)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k != TOKEN_PARAM]
    if token is None:
        token = next((v for k, v in query if k == TOKEN_PARAM), None)
    if len(kept) != len(query):
        target = urlunsplit(parts._replace(query=urlencode(kept)))
    return token, target


class ConnectProxy(Listener):
    """The server's connect-token endpoint."""

    def __init__(self, *, host: str, ssl_context: ssl.SSLContext) -> None:
        super().__init__(host, ssl_context)
        self._grants: dict[str, Grant] = {}

    def grant(self, grant: Grant) -> str:
        token = secrets.token_urlsafe(32)
        self._grants[token] = grant
        return token

    def revoke_sandbox(self, sandbox_id: str) -> None:
        """A sandbox finished: its tokens stop working."""
        for token in [t for t, g in self._grants.items() if g.sandbox_id == sandbox_id]:
            del self._grants[token]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            writer.write(_response("431 Request Header Fields Too Large", "request head too large"))
            return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            return
        if len(head) > _MAX_HEAD:
            writer.write(_response("431 Request Header Fields Too Large", "request head too large"))
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            writer.write(_response("400 Bad Request", "malformed request line"))
            return
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                writer.write(_response("400 Bad Request", "malformed header line"))
                return
            headers.append((name.strip(), value.strip()))
        token, target = _take_token(target, headers)
        grant = self._grants.get(token) if token else None
        if grant is None:
            writer.write(_response("401 Unauthorized", "missing or invalid Modal connect token"))
            return
        if not peer_allowed(writer, grant.allow):
            writer.write(_response("403 Forbidden", "address not in inbound_cidr_allowlist"))
            return
        upgrade = any(n.lower() == "upgrade" for n, _ in headers)
        out = [
            (n, v)
            for n, v in headers
            if n.lower() not in (VERIFIED_HEADER, "authorization")
            and not (not upgrade and n.lower() in ("connection", "keep-alive"))
        ]
        if grant.user_metadata is not None:
            out.append(("X-Verified-User-Data", grant.user_metadata))
        if not upgrade:
            out.append(("Connection", "close"))
        try:
            upstream = await asyncio.wait_for(grant.connect(grant.port), _CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            writer.write(
                _response(
                    "502 Bad Gateway",
                    f"nothing accepts connections on port {grant.port} in sandbox "
                    f"{grant.sandbox_id}",
                )
            )
            return
        new_head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in out)
        upstream[1].write(new_head.encode("latin-1") + b"\r\n")
        try:
            await pipe((reader, writer), upstream)
        finally:
            await close_writer(upstream[1])
