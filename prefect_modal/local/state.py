"""Everything the local server remembers: apps, images, secrets, volumes, sandboxes.

All of it lives on the server's event loop thread (no locks needed); only
`Registry.records()` is read from other threads, through the loop. The sandbox
listing is mirrored to ``<state_dir>/sandboxes.json`` after every change, so
another process (the CLI, a test) can read it.  The file is written by a
worker thread, never by the loop: each write is a few system calls, and every
one of them hands the GIL away, which in an embedded server stalled all RPCs
for milliseconds per write under load.  Writes coalesce, and the RPCs that
change what the listing shows (create, wait, terminate, tags) answer only once
`flushed()` says the file has caught up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ids
from .build.builder import ImageState
from .records import SandboxRecord, record_json, write_listing
from .runtime.sandbox import LocalSandbox

log = logging.getLogger("prefect_modal.local")

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LISTING_FINISHED_KEPT = 500  # finished sandboxes kept in sandboxes.json
DEFAULT_RETENTION_S = 3600.0  # finished sandboxes are forgotten this long after they end
PRUNED_REMEMBERED = 10_000  # ids of pruned sandboxes kept, to say "pruned" rather than "unknown"


@dataclass
class ImageInfo:
    id: str
    description: str
    env: dict[str, str] = field(default_factory=dict)
    #: file trees copied, in order, into the root of a sandbox made from it
    #: (a snapshot's files, ``add_local_*(copy=True)``, an ``apt_install``);
    #: what they hold under /usr or /etc is overlaid there: see `runtime.layers`
    layers: list[Path] = field(default_factory=list)
    #: how it was built (its Python environment, workdir...), once it is; None for
    #: images that are not built here (snapshots of such, and images being built)
    state: ImageState | None = None
    #: the build in progress or done (logs, result), for ImageJoinStreaming
    build: Any = None


@dataclass
class MountInfo:
    """Local files the client uploaded (``Image.add_local_*``): a tree laid out as
    the sandbox sees it, copied into the roots of the sandboxes that name it."""

    id: str
    tree: Path
    paths: list[str]  # the remote paths of its files


@dataclass
class SecretInfo:
    id: str
    name: str | None
    values: dict[str, str] = field(repr=False)
    created_at: float = field(default_factory=time.time)


#: Modal's app states (``modal_proto.api_pb2.AppState``), by the names the server uses
APP_EPHEMERAL, APP_DETACHED, APP_DEPLOYED, APP_STOPPED = 1, 2, 3, 5


@dataclass
class AppInfo:
    """An app as `modal app list` shows it.

    ``heartbeat`` is the monotonic time of the last `AppHeartbeat` of an app a
    client made with ``AppCreate`` (`modal run`, ``app.run()``): such an app
    lives while its client heartbeats, as on Modal; None for the others.
    """

    id: str
    name: str
    environment: str
    state: int
    created_at: float = field(default_factory=time.time)
    stopped_at: float | None = None
    heartbeat: float | None = None


@dataclass
class VolumeInfo:
    id: str
    name: str  # "" for an ephemeral volume
    path: Path
    #: Modal's VolumeFS version (1 or 2): it decides which RPCs the client sends
    version: int = 2
    #: monotonic time of the last heartbeat of an ephemeral volume (None: a named one)
    heartbeat: float | None = None
    created_at: float = field(default_factory=time.time)


class Registry:
    """The server's state; owned by the event loop thread."""

    def __init__(
        self,
        state_dir: Path,
        secrets: dict[str, dict[str, str]] | None = None,
        retention_s: float | None = DEFAULT_RETENTION_S,
    ) -> None:
        self.state_dir = state_dir
        self.retention_s = retention_s or None  # None (or 0): keep for the server's life
        state_dir.mkdir(parents=True, exist_ok=True)
        # ephemeral volumes end with the server that made them (a state dir may be reused)
        shutil.rmtree(state_dir / "volumes-ephemeral", ignore_errors=True)
        self.apps: dict[tuple[str, str], str] = {}
        self.app_names: dict[str, str] = {}
        self.app_info: dict[str, AppInfo] = {}
        self._last_created = 0.0  # see `creation_time`
        self.environments: dict[str, str] = {}
        self.images: dict[str, ImageInfo] = {}
        self._image_keys: dict[bytes, str] = {}
        self.mounts: dict[str, MountInfo] = {}  # by id, and by the digest of its file list
        self.secrets_by_name: dict[str, SecretInfo] = {}
        self.secrets_by_id: dict[str, SecretInfo] = {}
        self.volumes_by_name: dict[str, VolumeInfo] = {}
        self.volumes_by_id: dict[str, VolumeInfo] = {}
        self.sandboxes: dict[str, LocalSandbox] = {}
        self.by_task: dict[str, LocalSandbox] = {}
        # sandbox or task id -> sandbox id, for those pruned (bounded: PRUNED_REMEMBERED)
        self._pruned: OrderedDict[str, str] = OrderedDict()
        # sandbox id -> (what its record depended on, the record's JSON): see `_encoded`
        self._listing_cache: dict[str, tuple[tuple[object, ...], str]] = {}
        self._generation = 0  # changes noted
        self._written = 0  # changes on disk
        self._writer: asyncio.Task[None] | None = None
        self._written_cond = asyncio.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        for name, values in (secrets or {}).items():
            self.define_secret(name, values)

    # ----- apps / environments --------------------------------------------

    def creation_time(self) -> float:
        """Now, strictly later than any earlier creation: Modal's listings page by
        ``created_before = items[-1]...created_at``, so two objects must never
        share a creation time (one of them would be skipped)."""
        self._last_created = max(time.time(), self._last_created + 1e-6)
        return self._last_created

    def app_get_or_create(self, name: str, environment: str, create: bool) -> str | None:
        key = (environment or "main", name)
        app_id = self.apps.get(key)
        if app_id is None and create:
            app_id = self.new_app(name, environment, APP_DEPLOYED).id
            self.apps[key] = app_id
        return app_id

    def ephemeral_app(self, name: str) -> str:
        return self.new_app(name, "", APP_EPHEMERAL).id

    def new_app(
        self, name: str, environment: str, state: int, heartbeat: float | None = None
    ) -> AppInfo:
        info = AppInfo(
            ids.new_id("ap"),
            name,
            environment or "main",
            state,
            created_at=self.creation_time(),
            heartbeat=heartbeat,
        )
        self.app_names[info.id] = name
        self.app_info[info.id] = info
        return info

    def stop_app(self, info: AppInfo) -> list[LocalSandbox]:
        """Mark an app stopped (a deployed one gives up its name); its running
        sandboxes, which the caller terminates, as on Modal."""
        if info.state != APP_STOPPED:
            info.state = APP_STOPPED
            info.stopped_at = time.time()
            key = (info.environment, info.name)
            if self.apps.get(key) == info.id:
                del self.apps[key]
        return [
            sb
            for sb in self.sandboxes.values()
            if sb.spec.app_id == info.id and not sb.done.is_set()
        ]

    def environment_id(self, name: str) -> str:
        key = name or "main"
        if key not in self.environments:
            self.environments[key] = ids.new_id("en")
        return self.environments[key]

    # ----- images ----------------------------------------------------------

    def image_get_or_create(
        self,
        key: bytes,
        description: str,
        env: dict[str, str],
        layers: list[Path] | None = None,
    ) -> ImageInfo:
        """Images are recorded, never built: the same definition gets the same id."""
        image_id = self._image_keys.get(key)
        if image_id is None:
            image_id = ids.new_id("im")
            self._image_keys[key] = image_id
            self.images[image_id] = ImageInfo(image_id, description, env, list(layers or []))
        return self.images[image_id]

    def image_dir(self, image_id: str) -> Path:
        """Where an image's own files live (``layer``: its snapshot or copied files)."""
        return self.state_dir / "images" / image_id

    def add_image(self, info: ImageInfo) -> ImageInfo:
        """Register an image made by the server itself (a snapshot): no definition key."""
        self.images[info.id] = info
        return info

    # ----- secrets ---------------------------------------------------------

    def define_secret(self, name: str, values: dict[str, str]) -> SecretInfo:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid secret name {name!r}: use letters, digits, '.', '_' or '-'")
        old = self.secrets_by_name.get(name)
        info = SecretInfo(
            old.id if old else ids.new_id("st"),
            name,
            {str(k): str(v) for k, v in values.items()},
            created_at=old.created_at if old else self.creation_time(),
        )
        self.secrets_by_name[name] = info
        self.secrets_by_id[info.id] = info
        return info

    def anonymous_secret(self, values: dict[str, str]) -> SecretInfo:
        info = SecretInfo(ids.new_id("st"), None, dict(values))
        self.secrets_by_id[info.id] = info
        return info

    # ----- volumes ---------------------------------------------------------

    def volume_get_or_create(self, name: str, create: bool, version: int = 2) -> VolumeInfo | None:
        info = self.volumes_by_name.get(name)
        path = self.state_dir / "volumes" / name
        if info is None and (create or path.is_dir()):
            path.mkdir(parents=True, exist_ok=True)
            info = VolumeInfo(
                ids.new_id("vo"), name, path, version=version, created_at=self.creation_time()
            )
            self.volumes_by_name[name] = info
            self.volumes_by_id[info.id] = info
        return info

    def ephemeral_volume(self, version: int) -> VolumeInfo:
        """A nameless volume that lives while its client sends heartbeats."""
        vid = ids.new_id("vo")
        path = self.state_dir / "volumes-ephemeral" / vid
        path.mkdir(parents=True)
        info = VolumeInfo(vid, "", path, version=version, heartbeat=time.monotonic())
        self.volumes_by_id[vid] = info
        return info

    def forget_secret(self, info: SecretInfo) -> None:
        """Drop a named secret: later lookups by name or id fail (running sandboxes keep
        the values they started with, as on Modal)."""
        self.secrets_by_id.pop(info.id, None)
        if info.name and self.secrets_by_name.get(info.name) is info:
            del self.secrets_by_name[info.name]

    def forget_volume(self, info: VolumeInfo) -> None:
        """Drop a volume from the registry (its directory is the caller's to remove)."""
        self.volumes_by_id.pop(info.id, None)
        if info.name and self.volumes_by_name.get(info.name) is info:
            del self.volumes_by_name[info.name]

    # ----- sandboxes -------------------------------------------------------

    def add_sandbox(self, sb: LocalSandbox) -> None:
        """Register a sandbox (its start, right after, writes the listing)."""
        self.sandboxes[sb.id] = sb
        self.by_task[sb.task_id] = sb

    def remove_sandbox(self, sb: LocalSandbox) -> None:
        """Forget a finished sandbox (retention): records, listing, output buffers.

        The caller removes its directory. Its ids are remembered (a bounded
        number) so that a late lookup says it was pruned, not that it never was.
        """
        self.sandboxes.pop(sb.id, None)
        self.by_task.pop(sb.task_id, None)
        self._listing_cache.pop(sb.id, None)
        for buf in (sb.stdout, sb.stderr):
            buf.discard()
        for ex in sb.execs.values():
            ex.stdout.discard()
            ex.stderr.discard()
        for key in (sb.id, sb.task_id):
            self._pruned[key] = sb.id
        while len(self._pruned) > 2 * PRUNED_REMEMBERED:
            self._pruned.popitem(last=False)
        self.changed()

    def missing(self, kind: str, key: str) -> str:
        """Why ``key`` (a sandbox or task id) is not found: pruned, or unknown."""
        retention = f"{self.retention_s:g} s" if self.retention_s else ""
        sandbox_id = self._pruned.get(key)
        if sandbox_id is not None:
            what = f"{kind} {key!r}" + (f" (sandbox {sandbox_id})" if sandbox_id != key else "")
            return (
                f"{what} not found: it finished and was pruned after {retention}, the local "
                "Modal server's retention for finished sandboxes (LocalModal(retention_s=...), "
                "`prefect-modal local serve --retention`)"
            )
        hint = f" (finished sandboxes are pruned after {retention})" if retention else ""
        return f"{kind} {key!r} not found{hint}"

    def running_with_name(self, app_id: str, name: str) -> LocalSandbox | None:
        for sb in self.sandboxes.values():
            if sb.spec.app_id == app_id and sb.spec.name == name and not sb.done.is_set():
                return sb
        return None

    def records(self) -> list[SandboxRecord]:
        return [sb.record() for sb in self.sandboxes.values()]

    def changed(self) -> None:
        """Note a change of the listing; a write including it starts soon (see `flushed`)."""
        self._generation += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_changes())

    async def flushed(self) -> None:
        """Wait until sandboxes.json shows every change made so far."""
        target = self._generation
        async with self._written_cond:
            await self._written_cond.wait_for(lambda: self._written >= target)

    async def _write_changes(self) -> None:
        while self._written < self._generation:
            generation = self._generation
            parts = self._listing_parts()  # a consistent snapshot, taken on the loop
            try:
                await asyncio.to_thread(write_listing, self.state_dir / "sandboxes.json", parts)
            except OSError as exc:
                log.warning("could not write the sandbox listing: %s", exc.strerror)
            async with self._written_cond:
                self._written = generation
                self._written_cond.notify_all()

    def _listed(self) -> list[LocalSandbox]:
        """What sandboxes.json shows: every running sandbox and the latest finished ones."""
        finished = [sb for sb in self.sandboxes.values() if sb.done.is_set()]
        keep = {sb.id for sb in finished[-LISTING_FINISHED_KEPT:]}
        return [sb for sb in self.sandboxes.values() if not sb.done.is_set() or sb.id in keep]

    def _encoded(self, sb: LocalSandbox) -> str:
        """The record's JSON, re-encoded only when something it shows has changed."""
        key = sb.listing_key()
        cached = self._listing_cache.get(sb.id)
        if cached is None or cached[0] != key:
            cached = (key, record_json(sb.record()))
            self._listing_cache[sb.id] = cached
        return cached[1]

    def _listing_parts(self) -> list[str]:
        listed = self._listed()
        if len(self._listing_cache) > 2 * len(listed):
            ids_listed = {sb.id for sb in listed}
            self._listing_cache = {k: v for k, v in self._listing_cache.items() if k in ids_listed}
        return [self._encoded(sb) for sb in listed]

    def flush(self) -> None:
        """Write the listing now, from the calling thread (server start and stop)."""
        try:
            write_listing(self.state_dir / "sandboxes.json", self._listing_parts())
        except OSError as exc:
            log.warning("could not write the sandbox listing: %s", exc.strerror)
