"""Each tunnel's own host on port 443, as Modal gives them.

On Modal every tunnel is a host of its own on port 443
(``tunnel.tls_socket == ('wtqcahqwhd4tu0.r5.modal.host', 443)``,
https://modal.com/docs/guide/tunnels), and the client leaves the port out of
``tunnel.url`` when it is 443 (``modal/_tunnel.py``, ``Tunnel.url``). So code
that builds ``https://{tunnel.host}/`` itself (smolagents' ModalExecutor) works
there. Here each tunnel gets an address of its own in 127.0.0.0/8, which Linux
routes to the loopback without any setup, and listens on its port 443.

Binding a port below 1024 needs root, ``CAP_NET_BIND_SERVICE`` or a low
``net.ipv4.ip_unprivileged_port_start``. Where the server has none of them,
the tunnel listens on a free port of its address instead, and `BoundHost.fallback`
says why (the tunnel manager writes it to the sandbox's log; never silently).
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Modal's tunnel port
TUNNEL_PORT = 443
_TRIES = 64
_UNPRIVILEGED_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@dataclass
class BoundHost:
    """A listening socket's address, bound but not yet listening (asyncio listens)."""

    sock: socket.socket
    host: str
    port: int
    fallback: str | None = None

    @property
    def public_host(self) -> str:
        """The host as a URL needs it (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host


def _random_hosts(rng: random.Random) -> Iterator[str]:
    """Addresses of 127.0.0.0/8 outside 127.0.x.x (127.0.0.1, systemd's 127.0.0.53,
    Debian's 127.0.1.1 live there) and 127.255.x.x (its broadcast address)."""
    while True:
        yield f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def why_no_low_port() -> str:
    """Why this process cannot bind port 443, in words a user can act on."""
    try:
        start = _UNPRIVILEGED_START.read_text().strip()
        where = f" (it is {start} here)"
    except OSError:
        where = ""
    return (
        "this server may not bind port 443: run it as root, give it CAP_NET_BIND_SERVICE, or "
        f"set net.ipv4.ip_unprivileged_port_start to 443 or less{where}"
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tunnel_host(
    loopback: str,
    *,
    in_use: Iterable[str] = (),
    known: Iterable[str] = (),
    port: int = TUNNEL_PORT,
    rng: random.Random | None = None,
) -> BoundHost:
    """Bind a host of its own on ``port`` for a tunnel.

    ``loopback`` is the server's (``::1`` has no range of addresses: its tunnels
    share it, so only the first gets port 443). ``known`` addresses (those the
    state directory has certificates for) are tried before new ones, so a
    long-lived server does not mint a certificate per tunnel; ``in_use`` ones
    (this server's live tunnels) are skipped. An address another process holds
    port 443 of is skipped too.
    """
    rng = rng or random.Random()
    taken = set(in_use)
    if loopback == "::1":
        candidates: Iterable[str] = ["::1"]
    else:
        fresh = _random_hosts(rng)
        reuse = [h for h in known if h not in taken and _is_tunnel_address(h)]
        candidates = (h for h in (*reuse, *(next(fresh) for _ in range(_TRIES))) if h not in taken)
    last = "127.0.0.1" if loopback != "::1" else "::1"
    for host in candidates:
        last = host
        try:
            return BoundHost(_bind(host, port), host, port)
        except PermissionError:
            sock = _bind(host, 0)
            return BoundHost(sock, host, sock.getsockname()[1], why_no_low_port())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            if exc.errno == errno.EADDRNOTAVAIL and host != "127.0.0.1":
                # 127.0.0.0/8 is not all loopback here (not Linux): share 127.0.0.1
                return _shared(
                    "127.0.0.1",
                    port,
                    "this machine does not route 127.0.0.0/8 to "
                    "its loopback, so tunnels share 127.0.0.1",
                )
            raise
    return _shared(last, port, f"port {port} is in use on every address tried")


def _shared(host: str, port: int, reason: str) -> BoundHost:
    try:
        return BoundHost(_bind(host, port), host, port)
    except PermissionError:
        reason = why_no_low_port()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    sock = _bind(host, 0)
    return BoundHost(sock, host, sock.getsockname()[1], reason)


def _is_tunnel_address(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == 4 and ip.packed[0] == 127 and 1 <= ip.packed[1] <= 254
