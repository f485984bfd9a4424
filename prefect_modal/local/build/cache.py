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
per open file, so two builds in one process wait too); one that died midway
leaves a directory without ``meta.json``, removed by the next build.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
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

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def get_or_build(
        self, key: str, build: Callable[[Path], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], bool]:
        """The layer's metadata, built by ``build(directory)`` if no one has yet;
        and whether this call built it."""
        found = self.meta(key)
        if found is not None:
            self.hits += 1
            return found, False
        lock = self._locked(key)
        await asyncio.to_thread(lock.__enter__)
        try:
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
            lock.__exit__(None, None, None)
