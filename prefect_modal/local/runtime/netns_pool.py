"""Network namespaces made ahead, each with its pasta attached: pasta off the way to a start.

A sandbox's program starts once its namespace has a route out (it may reach
the network at once, as on Modal). Started per sandbox, pasta took 7 ms on an
idle machine and 10-20 ms on a loaded one, on the way to every create: the
largest part of a `true` sandbox's start. So the server keeps a few ready:
each a network namespace it made (``unshare(CLONE_NEWNET)`` in a short-lived
thread of its own: no other code of the server runs in it), its loopback up,
pasta attached and its route in place. A new sandbox's container joins one
(``setns``, `container.start`) and takes over its pasta; the pool makes the
next in the background. When the pool is empty (a burst of creates), the
sandbox makes its own namespace and attaches pasta itself, as before.

Making a namespace needs ``CAP_SYS_ADMIN`` (root): elsewhere the pool stays
empty and every sandbox attaches its own pasta.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import isolation, processes

log = logging.getLogger("prefect_modal.local")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_READY_S = 5.0
DEFAULT_SIZE = 2
T = TypeVar("T")
_NICE = 10  # a namespace made ahead is made with what CPU is left over


@dataclass
class Prepared:
    """A namespace (``fd``, ours to pass on or close) with its pasta running."""

    fd: int
    pasta: subprocess.Popen[bytes]


def _in_new_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread of its own (namespace calls switch only the calling
    thread, which then ends) and return its result or raise its error."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name="prefect-modal-netns-pool")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


#: per-namespace settings (written in the new namespace, ``/proc/sys/net`` is the
#: writer's): a namespace made here belongs to this server's user namespace, not to a
#: sandbox's, so root inside a sandbox holds no capability over it (it cannot change
#: its routes or addresses, which is what we want) and would lack the one it needs to
#: bind ports below 1024. As rootless Docker and Podman do, every port is open to
#: every user, and ICMP echo sockets too (``ping`` without raw sockets).
_NETNS_SYSCTLS = {
    "net/ipv4/ip_unprivileged_port_start": "0",
    "net/ipv4/ping_group_range": "0 2147483647",
}


def _as_a_containers_own() -> None:
    for name, value in _NETNS_SYSCTLS.items():
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(value)


def _new_netns() -> int:
    """An fd of a new network namespace with its loopback up."""

    def make() -> int:
        if _libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNET)")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
        _as_a_containers_own()
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    return _in_new_thread(make)


def _wait_route(fd: int, pasta: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the namespace got its route out before ``deadline`` (pasta alive)."""

    def wait() -> bool:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            return False
        while pasta.poll() is None and time.monotonic() < deadline:
            if isolation.has_outbound_route("thread-self"):
                return True
            time.sleep(0.01)  # no sandbox waits for this one: look rarely, spare the GIL
        return False

    return _in_new_thread(wait)


class NetnsPool:
    """Up to ``size`` ready namespaces; `take` one, `close` at the server's stop."""

    def __init__(self, log_path: Path, size: int = DEFAULT_SIZE) -> None:
        self._log_path = log_path
        self._size = size
        self._ready: list[Prepared] = []
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = 0
        self._making: int | None = None  # the pid of the pasta being made ready

    def start(self) -> None:
        self._kick()

    def pids(self) -> set[int]:
        """The pasta processes the pool holds (ready or being made): no sandbox's."""
        held = {p.pasta.pid for p in self._ready}
        return held | ({self._making} if self._making is not None else set())

    def take(self) -> Prepared | None:
        """A ready namespace, or None (then the sandbox makes its own)."""
        while self._ready:
            prepared = self._ready.pop(0)
            if prepared.pasta.poll() is None:
                with contextlib.suppress(OSError):  # now a sandbox's network: as any process
                    os.setpriority(os.PRIO_PROCESS, prepared.pasta.pid, 0)
                self._kick()
                return prepared
            os.close(prepared.fd)
        self._kick()
        return None

    def _kick(self) -> None:
        if self._closed or (self._refill is not None and not self._refill.done()):
            return
        if self._failures >= 3:  # this machine cannot: every sandbox attaches its own
            return
        self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._ready) < self._size:
            prepared = await self._prepare()
            if prepared is None:
                self._failures += 1
                return
            self._failures = 0
            if self._closed:
                _stop(prepared)
                return
            self._ready.append(prepared)

    async def _prepare(self) -> Prepared | None:
        try:
            fd = await asyncio.to_thread(_new_netns)
        except OSError as exc:
            log.debug("no network namespace made ahead: %s", exc)
            return None
        try:
            argv, preexec = processes.with_pdeathsig(
                isolation.pasta_command(fd), {"PATH": "/usr/bin:/bin"}
            )
            with open(self._log_path, "ab") as log_file:
                pasta = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(fd,),
                    preexec_fn=preexec,
                    start_new_session=True,
                )
        except OSError as exc:
            os.close(fd)
            log.debug("pasta did not start for a namespace made ahead: %s", exc)
            return None
        prepared = Prepared(fd, pasta)
        self._making = pasta.pid
        with contextlib.suppress(OSError):  # made ahead: after any sandbox's own work
            os.setpriority(os.PRIO_PROCESS, pasta.pid, _NICE)
        deadline = time.monotonic() + _READY_S
        try:
            if not await asyncio.to_thread(_wait_route, fd, pasta, deadline):
                _stop(prepared)
                return None
            return prepared
        finally:
            self._making = None

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:  # not cancelled: it would leave its pasta running
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._refill), _READY_S + 1)
        ready, self._ready = self._ready, []
        for prepared in ready:
            _stop(prepared)


def _stop(prepared: Prepared) -> None:
    with contextlib.suppress(OSError):
        os.close(prepared.fd)
    if prepared.pasta.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            prepared.pasta.kill()
    prepared.pasta.wait()


__all__ = ["DEFAULT_SIZE", "NetnsPool", "Prepared"]
