"""Sockets made inside a sandbox's network namespace, for a server that is not root.

Why a process: a socket belongs to the network namespace it was made in, so
the server reaches a sandbox's ports (tunnels, probes, forwards) by making the
socket there and using it from its own threads. As root, a short-lived thread
enters the namespace (`isolation.socket_in_netns`). A normal user's server
holds no capability in the host's user namespace, so it must enter the
sandbox's user namespace first, and the kernel lets no multithreaded process
do that (``setns(2)``: EINVAL). So, for each sandbox whose sockets are asked
for, a small single-threaded Python process enters its user and network
namespaces once, then makes a socket on each request and hands it back over a
socketpair (``SCM_RIGHTS``). It ends when the server closes its end (the
sandbox ended) or the server dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

from . import processes

#: the broker: standard library only, in a fresh ``python -I -S``
_BROKER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, chan_fd = sys.argv[1], int(sys.argv[2])
for name, flag in (("user", 0x10000000), ("net", 0x40000000)):
    fd = os.open("/proc/%s/ns/%s" % (pid, name), os.O_RDONLY | os.O_CLOEXEC)
    if libc.setns(fd, flag) != 0:
        err = ctypes.get_errno()
        os.write(2, ("setns(%s): %s\n" % (name, os.strerror(err))).encode())
        sys.exit(1)
    os.close(fd)
chan = socket.socket(fileno=chan_fd)
while True:
    request = chan.recv(1)
    if not request:
        break
    s = socket.socket(socket.AF_INET6 if request == b"6" else socket.AF_INET)
    socket.send_fds(chan, [b"s"], [s.fileno()])
    s.close()
"""


class NetnsSockets:
    """One sandbox's broker (see the module's docstring)."""

    def __init__(self, pid: int) -> None:
        self._chan, theirs = socket.socketpair()
        argv, preexec = processes.with_pdeathsig(
            [sys.executable, "-I", "-S", "-c", _BROKER, str(pid), str(theirs.fileno())],
            {"PATH": "/usr/bin:/bin"},
        )
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                preexec_fn=preexec,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._lock = threading.Lock()

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket of the sandbox's network namespace (blocking: run it in a thread)."""
        with self._lock:
            try:
                self._chan.sendall(b"6" if family == socket.AF_INET6 else b"4")
                _, fds, _, _ = socket.recv_fds(self._chan, 1, 1)
            except OSError:
                fds = []
            if not fds:
                raise OSError(
                    2, f"cannot make a socket in the sandbox's network namespace: {self._why()}"
                )
        return socket.socket(fileno=fds[0])

    def _why(self) -> str:
        if self._proc.poll() is None:
            return "its broker did not answer"
        assert self._proc.stderr is not None
        said = self._proc.stderr.read().decode(errors="replace").strip()
        return said or f"its broker exited {self._proc.returncode}"

    def close(self) -> None:
        """End the broker (it ends at EOF; killed if it does not)."""
        self._chan.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
