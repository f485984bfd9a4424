"""The image-layer cache's build lock: a waiter that gives up never keeps it.

A build of a layer waits (``flock``, in a worker thread) while another build of
the same layer runs, in this process or another. Cancelling that waiter (a
client gone, a timeout, a server stop) cannot stop its thread: the thread may
take the lock after its waiter is gone, and the lock must then be given back,
or every later build of that layer in this process waits forever.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from prefect_modal.local.build.cache import LayerCache, layer_key


def _close_descriptors_on(path: Path) -> None:
    """Close this process's descriptors still open on `path` (there are none when the
    cache is right), so a regression fails this test instead of leaving a thread in
    ``flock`` that would hang the interpreter's exit."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                os.close(int(fd))
        except OSError:
            pass


def test_a_cancelled_waiting_build_leaves_the_lock_to_the_next_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = LayerCache(tmp_path / "images")
    key = layer_key("", {"test": "cancelled waiter"})
    lock_path = cache.root / f"{key}.lock"

    # Learn when the waiter's thread calls flock (it blocks there: the lock is held)
    # and when it has the lock.
    real_flock = fcntl.flock
    in_flock, took = threading.Event(), threading.Event()

    def flock(fd: int, operation: int) -> None:
        in_flock.set()
        real_flock(fd, operation)
        took.set()

    monkeypatch.setattr(fcntl, "flock", flock)

    async def build(directory: Path) -> dict[str, Any]:
        (directory / "layer.txt").write_text("built")
        return {"built_in": str(directory)}

    async def scenario() -> tuple[dict[str, Any], bool]:
        # Another build of the layer holds the lock (as another server process would).
        cache.root.mkdir(parents=True)
        holder = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        real_flock(holder, fcntl.LOCK_EX)
        try:
            waiter = asyncio.create_task(cache.get_or_build(key, build))
            assert await asyncio.to_thread(in_flock.wait, 60), "the waiter never reached flock"
            waiter.cancel()
            # Kept, as a caller's log record or error report keeps it: its traceback
            # holds the cancelled build's frame. (Before the fix, only the garbage
            # collection of that frame gave the lock back.)
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await waiter
            assert cancelled.value is not None
        finally:
            # That build ends without a layer (it failed): the cancelled waiter's
            # thread, still in flock, now takes the lock that nobody wants.
            os.close(holder)
        assert await asyncio.to_thread(took.wait, 60), "the waiter's thread never got the lock"
        try:
            return await asyncio.wait_for(cache.get_or_build(key, build), 60)
        finally:
            _close_descriptors_on(lock_path)

    meta, built = asyncio.run(scenario())
    assert built and (Path(meta["built_in"]) / "layer.txt").read_text() == "built"
    assert cache.meta(key) == meta and cache.builds == 1
