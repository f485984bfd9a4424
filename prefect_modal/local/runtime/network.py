"""A sandbox's network: a namespace of its own, and the host ports forwarded into it on purpose.

Every isolated sandbox has a network namespace of its own (`container` makes
it), with its own loopback, so nothing a program of this machine serves on
``127.0.0.1`` is reachable from inside: not a Prefect server's Secret blocks,
not a database, not another tool's admin port. What it gets besides:

* **Outbound access**, as on Modal (a sandbox reaches the internet unless
  ``block_network=True``): ``pasta`` (Debian package ``passt``) connects the
  namespace to this machine's network with ``--no-map-gw``, so the gateway
  address is the real gateway, never this machine's loopback
  (`isolation.pasta_command`). Without pasta the sandbox has loopback only
  (what ``block_network=True`` gives), and the server says so when it starts
  and in the sandbox's log (`NO_PASTA_NOTICE`).
* **Forwarded ports**, the only way to this machine's loopback: a sandbox
  whose ``PREFECT_API_URL`` is a loopback URL (a flow run's sandbox, with the
  Prefect server on this machine) gets that port, and one whose
  ``MODAL_SERVER_URL`` names this server (a per-step flow run's sandbox, which
  starts its tasks' sandboxes) gets this server's ports. The server listens on
  that port of the sandbox's own loopback (`socket_in_netns`) and relays each
  connection to the port on this machine; the variable is rewritten to
  ``127.0.0.1`` (``localhost`` could mean ``::1`` inside). This is a local
  convenience, not Modal's: on Modal a sandbox reaches only public addresses.

The relay is the server's, not pasta's (``-T``), so forwarded ports work the
same where pasta is missing (a pip-only install still runs flows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from . import isolation
from .relay import Listener, pipe

log = logging.getLogger("prefect_modal.local")

#: The variable that names the Prefect API a flow run's sandbox reports to.
API_URL_VAR = "PREFECT_API_URL"
#: The variable that names the Modal server a sandbox's own modal client uses.
MODAL_URL_VAR = "MODAL_SERVER_URL"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

NO_PASTA_NOTICE = (
    "[prefect-modal local] this sandbox has a network of its own with loopback only: "
    "outbound network access needs pasta, which is not installed "
    "(sudo apt-get install passt).\n"
)
NO_PASTA_WARNING = (
    "pasta is not installed, so sandboxes of this local Modal server have loopback only, "
    "with no outbound network access (Modal gives them the internet unless "
    "block_network=True): sudo apt-get install passt"
)
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Forward:
    """A port of the sandbox's loopback whose connections go to a host loopback port."""

    inside: str  # the sandbox's address: 127.0.0.1 or ::1
    port: int  # the same port on both sides: the URL keeps its port
    host: str  # where it goes on this machine (127.0.0.1, ::1 or localhost)


def _loopback(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL on this machine's loopback, else None."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or host not in LOOPBACK_HOSTS:
        return None
    return host, port or (443 if parts.scheme == "https" else 80)


def _rewritten(url: str) -> str:
    """``url`` with a ``localhost`` host spelt ``127.0.0.1``, where the forward listens."""
    parts = urlsplit(url.strip())
    if parts.hostname != "localhost":
        return url
    netloc = parts.netloc.rsplit("@", 1)
    where = netloc[-1].replace("localhost", "127.0.0.1", 1)
    return urlunsplit(parts._replace(netloc="@".join([*netloc[:-1], where])))


def _forward(host: str, port: int) -> Forward:
    return Forward("::1" if host == "::1" else "127.0.0.1", port, host)


async def plan(
    env: dict[str, str], server_url: str, blob_url: Callable[[], Awaitable[str]]
) -> tuple[dict[str, str], list[Forward]]:
    """The sandbox's environment (its loopback URLs rewritten) and its forwards.

    ``server_url`` is this server's; ``blob_url`` starts its blob endpoint (the
    modal client uploads and downloads there) and gives its URL. Only these
    variables open a port: whatever else a sandbox's env names stays unreachable.
    """
    env = dict(env)
    forwards: dict[tuple[str, int], Forward] = {}
    api = _loopback(env.get(API_URL_VAR, ""))
    if api is not None:
        fw = _forward(*api)
        forwards[(fw.inside, fw.port)] = fw
        env[API_URL_VAR] = _rewritten(env[API_URL_VAR])
    ours = _loopback(server_url)
    named = _loopback(env.get(MODAL_URL_VAR, ""))
    if ours is not None and named is not None and named[1] == ours[1]:
        env[MODAL_URL_VAR] = _rewritten(env[MODAL_URL_VAR])
        for where in (ours, _loopback(await blob_url())):
            if where is not None:
                fw = _forward(*where)
                forwards.setdefault((fw.inside, fw.port), fw)
    return env, list(forwards.values())


#: a URL on this machine's loopback, wherever it is written (an argument, a variable, a
#: line of a requirements file or of uv.toml)
_LOOPBACK_URL = re.compile(r"https?://(?:[^\s/@'\"]*@)?(?:127\.0\.0\.1|localhost|\[::1\])(?::\d+)?")


def build_forwards(texts: Iterable[str]) -> list[Forward]:
    """The loopback ports an image build step names: its package indexes.

    Why: a build step runs in a build sandbox with a network of its own, so an
    sdist's build code cannot reach this machine's loopback (a Prefect server's
    Secret blocks), while the step still reaches its index, as Modal's build
    reaches PyPI. An index on this machine's loopback (a private mirror, the
    tests' index) is reached only through the ports its URL names in the step's
    own arguments, environment or configuration files.
    """
    forwards: dict[tuple[str, int], Forward] = {}
    for text in texts:
        for match in _LOOPBACK_URL.finditer(text):
            where = _loopback(match.group(0))
            if where is not None:
                fw = _forward(*where)
                forwards.setdefault((fw.inside, fw.port), fw)
    return list(forwards.values())


class _Forwarder(Listener):
    """One forward: accepts on the sandbox's loopback, connects to the host's."""

    def __init__(self, forward: Forward) -> None:
        super().__init__(forward.inside, None)
        self.forward = forward

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.forward.host, self.forward.port), _CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError):
            return  # nothing listens on the host's port: the sandbox sees a close
        await pipe((reader, writer), upstream)


def _listening_socket(init_pid: int, forward: Forward) -> socket.socket:
    family = socket.AF_INET6 if forward.inside == "::1" else socket.AF_INET
    sock = isolation.socket_in_netns(init_pid, family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((forward.inside, forward.port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Forwards:
    """The forwarded ports of one sandbox; `close` ends them with it (their
    sockets hold its network namespace)."""

    def __init__(self) -> None:
        self._listeners: list[_Forwarder] = []

    async def open(self, init_pid: int, forwards: Sequence[Forward]) -> list[str]:
        """Listen on each forward inside the sandbox; returns what failed, in words."""
        failed = []
        for fw in forwards:
            listener = _Forwarder(fw)
            try:
                sock = await asyncio.to_thread(_listening_socket, init_pid, fw)
                await listener.start(sock)
            except OSError as exc:
                failed.append(f"{fw.inside}:{fw.port} ({exc.strerror or exc})")
                continue
            self._listeners.append(listener)
        return failed

    async def close(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            with contextlib.suppress(Exception):
                await listener.close()


__all__ = [
    "API_URL_VAR",
    "MODAL_URL_VAR",
    "NO_PASTA_NOTICE",
    "NO_PASTA_WARNING",
    "Forward",
    "Forwards",
    "plan",
]
