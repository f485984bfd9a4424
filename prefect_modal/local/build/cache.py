"""Built layers, kept by the hash of their definition and their parent's (as Docker does).

The cache is a directory shared by every local server of the machine (tests
each start their own server and must not rebuild): by default
``~/.cache/prefect-modal/images``, or ``$PREFECT_MODAL_IMAGE_CACHE``, or
``LocalModal(image_cache=...)``. A layer is ``<root>/<key>/``; it is complete
once its ``meta.json`` is there (written to a temporary name and renamed, so
a reader never sees half of it). A layer's files stay at the path they were
built at: a virtual environment is seen at the same absolute path inside a
sandbox as on this machine, so its scripts and the warm fork server agree.

Builds of one key wait for one another (``flock`` on ``<key>.lock``, which is
per open file, so two builds in one process wait too); a waiter cancelled
while it waits gives the lock back all the same (`_LockClaim`); one that died
midway leaves a directory without ``meta.json``, removed by the next build.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "PREFECT_MODAL_IMAGE_CACHE"
#: Part of every key: a change in how layers are built invalidates old ones.
FORMAT = "prefect-modal-images-1"


def default_root() -> Path:
    value = os.environ.get(CACHE_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    return Path("~/.cache/prefect-modal/images").expanduser()


def layer_key(parent: str, definition: Any) -> str:
    """A layer's key: its parent's key and its definition (JSON-able)."""
    text = json.dumps([FORMAT, parent, definition], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class LayerCache:
    """Built layers on disk, and how many this server built or found."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).absolute()
        self.builds = 0
        self.hits = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def meta(self, key: str) -> dict[str, Any] | None:
        """The layer's metadata if it is built, else None."""
        try:
            with open(self.root / key / "meta.json", encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return None

    def _claim(self, key: str) -> _LockClaim:
        self.root.mkdir(parents=True, exist_ok=True)
        return _LockClaim(self.root / f"{key}.lock")

    async def get_or_build(
        self, key: str, build: Callable[[Path], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], bool]:
        """The layer's metadata, built by ``build(directory)`` if no one has yet;
        and whether this call built it."""
        found = self.meta(key)
        if found is not None:
            self.hits += 1
            return found, False
        claim = self._claim(key)
        try:
            # Inside the try: a waiter cancelled (or timed out) here still releases
            # the lock, now or as soon as its thread gets it (`_LockClaim`).
            await asyncio.to_thread(claim.take)
            found = self.meta(key)  # built by someone else while we waited
            if found is not None:
                self.hits += 1
                return found, False
            here = self.path(key)
            if here.exists():  # a build that died midway
                await asyncio.to_thread(shutil.rmtree, here, True)
            here.mkdir(parents=True)
            try:
                meta = await build(here)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, here, True)
                raise
            tmp = here / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
            os.rename(tmp, here / "meta.json")
            self.builds += 1
            return meta, True
        finally:
            claim.release()


class _LockClaim:
    """One waiter's claim on a layer's ``flock``, released whatever becomes of the waiter.

    The lock is taken in a worker thread (``flock`` blocks), and cancelling the
    coroutine that awaits that thread does not stop it: the thread may take the
    lock after its waiter is gone (cancelled by a client, a timeout, a server
    stop). A lock taken then and never released makes every later build of the
    layer in this process wait forever (``flock`` belongs to the open file, so
    even this process's own builds wait). `release` may come before, during or
    after `take`, from any thread; whichever of the two comes second closes the
    file, which releases the lock.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._released = False

    def take(self) -> None:
        """Wait for the lock (blocking: run in a thread)."""
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        with self._mutex:
            if not self._released:
                self._fd = fd
                return
        os.close(fd)  # the waiter gave up while this thread waited: let the next one in

    def release(self) -> None:
        """Give the lock back, or make a `take` still waiting give it back once it has it."""
        with self._mutex:
            self._released = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
