"""Bind a directory into a running sandbox, or take it out again (``mount_image``).

A running container's mount namespace cannot be entered by a thread of this
server (``setns`` into a mount namespace refuses a multi-threaded caller), so
a short-lived helper does it: it clones the source directory as a detached
mount while still in the host's namespace (``open_tree``), enters the
container's mount namespace (which also makes the container's root its ``/``,
so the target path means what it means to the sandbox), and attaches the clone
there (``move_mount``); or detaches the mount at the target (``umount2``).
A normal user's helper does it from inside the sandbox's user namespace (which
owns the container's mount namespace). Kernel 5.2 or later.
"""

from __future__ import annotations

import asyncio
import sys

_HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(r, what):
    if r < 0:
        e = ctypes.get_errno()
        sys.stderr.write(f"{what}: {os.strerror(e)}")
        sys.exit(1)
op, pid, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if os.geteuid() != 0:
    # a normal user acts from inside the sandbox's user namespace, which owns its mount
    # namespace; a mount namespace of our own there (a copy of this machine's) lets us
    # clone the source
    check(libc.setns(os.open(f"/proc/{pid}/ns/user", os.O_RDONLY), 0x10000000), "setns user")
    if op == "mount":
        check(libc.unshare(0x00020000), "unshare")
if op == "mount":
    # open_tree(AT_FDCWD, src, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    tree = libc.syscall(428, -100, sys.argv[4].encode(), 1 | 0o2000000 | 0x8000)
    check(tree, "open_tree")
ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
check(libc.setns(ns, 0x00020000), "setns")
if op == "mount":
    # move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)
    check(libc.syscall(429, tree, b"", -100, target.encode(), 4), "move_mount")
else:
    check(libc.umount2(target.encode(), 2), "umount")  # MNT_DETACH
"""


async def _run(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _HELPER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(err.decode(errors="replace").strip() or f"exit {proc.returncode}")


async def bind_into(init_pid: int, source: str, target: str) -> None:
    """Mount ``source`` (a host directory) at ``target`` inside the container of ``init_pid``."""
    await _run("mount", str(init_pid), target, source)


async def unmount_in(init_pid: int, target: str) -> None:
    """Detach whatever is mounted at ``target`` inside the container of ``init_pid``."""
    await _run("umount", str(init_pid), target)
