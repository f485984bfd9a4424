"""`ModalVolume`: a Prefect filesystem block over a Modal Volume.

Why a Volume: a flow run started from a laptop runs in a sandbox, and its
return value must land somewhere both the sandbox and the laptop can reach.
A Modal Volume is that place for anyone who already has Modal, so no second
cloud account (an S3 or GCS bucket) is needed to call a flow and get its value
back.  The same block serves Prefect's three storage roles:

* ``result_storage=`` of flows and tasks (``read_path`` / ``write_path``, the
  `WritableFileSystem` contract Prefect's result store uses);
* a work pool's default result storage, which ad-hoc calls (`@modal`) use when
  the flow names none;
* a work pool's bundle storage, through the ``prefect_modal.bundles`` upload and
  execute steps (`configure_pool_storage`).

Two ways in, same files: outside Modal the block talks to the Volume API with
the client (`modal_api.volume_*`); inside a sandbox that has the volume mounted
(the worker mounts it and says where in ``PREFECT_MODAL_VOLUME_MOUNTS``) it
reads and writes the mounted directory, so the sandbox needs no Modal token.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio.to_thread
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableDeploymentStorage, WritableFileSystem
from pydantic import Field, field_validator

from prefect_modal.core.credentials import ModalCredentials

#: JSON {volume name: mount path} set by the worker in sandboxes that mount volumes.
ENV_VOLUME_MOUNTS = "PREFECT_MODAL_VOLUME_MOUNTS"
#: Where the worker mounts a storage volume inside a sandbox.
MOUNT_ROOT = "/mnt/prefect-modal"
#: The volume and block an ad-hoc call uses when nothing else is configured.
DEFAULT_RESULTS_VOLUME = "prefect-modal-results"
DEFAULT_RESULTS_BLOCK = "prefect-modal-results"

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_volumes_lock = threading.Lock()
_volumes: dict[tuple[int, str, str | None], Any] = {}


def mount_path_for(volume_name: str) -> str:
    """The directory a storage volume is mounted at in the worker's sandboxes."""
    return f"{MOUNT_ROOT}/{volume_name}"


def mounted_volumes(environ: Any = os.environ) -> dict[str, str]:
    try:
        value = json.loads(environ.get(ENV_VOLUME_MOUNTS) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class ModalVolume(WritableFileSystem, WritableDeploymentStorage):
    """Files on a Modal Volume: flow and task results, and flow-run bundles.

    Save it once, then use it as ``result_storage=`` or as a work pool's storage
    (``prefect-modal pool storage configure POOL --volume V``).
    """

    _block_type_name = "Modal Volume"
    _block_type_slug = "modal-volume"
    _logo_url = "https://modal.com/assets/favicon.svg"  # type: ignore[assignment]
    _documentation_url = "https://github.com/prefect-modal/prefect-modal#storage"  # type: ignore[assignment]
    _code_example = """
    ```python
    from prefect import flow
    from prefect_modal.storage import ModalVolume

    results = ModalVolume(volume_name="my-results")
    results.save("my-results")

    @flow(result_storage=results, persist_result=True)
    def my_flow(): ...
    ```
    """

    volume_name: str = Field(
        default=DEFAULT_RESULTS_VOLUME,
        description="Name of the Modal Volume (created on first use).",
    )
    base_path: str = Field(
        default="",
        description="Folder inside the volume under which every path of this block lives.",
    )
    modal_credentials: ModalCredentials | None = Field(
        default=None,
        description="How to reach Modal; empty for Modal's own config (or the local server).",
    )
    environment_name: str | None = Field(
        default=None, description="Modal environment of the volume; empty for the default."
    )

    @field_validator("volume_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value or ""):
            raise ValueError(
                f"volume_name={value!r} is not a Modal volume name: use 1 to 64 letters, "
                "digits, '.', '_' or '-'."
            )
        return value

    @field_validator("base_path")
    @classmethod
    def _check_base(cls, value: str) -> str:
        norm = posixpath.normpath("/" + (value or "")).strip("/")
        if ".." in (value or "").split("/"):
            raise ValueError(
                f"base_path={value!r} may not contain '..'; use a folder in the volume."
            )
        return "" if norm == "." else norm

    # -- paths --------------------------------------------------------------------

    def volume_path(self, path: str) -> str:
        """`path` as a path in the volume ('/base/path'); refuses to leave `base_path`."""
        if ".." in str(path).split("/"):
            raise ValueError(f"path {path!r} may not contain '..' (volume {self.volume_name!r}).")
        return posixpath.normpath(posixpath.join("/", self.base_path, str(path).lstrip("/")))

    def _mount(self) -> str | None:
        where = mounted_volumes().get(self.volume_name)
        return where if where and os.path.isdir(where) else None

    def _volume(self) -> Any:
        from prefect_modal.core import modal_api
        from prefect_modal.core.targets import resolve_target

        client = resolve_target(self.modal_credentials).client
        env = self.environment_name or (
            self.modal_credentials.modal_environment if self.modal_credentials else None
        )
        key = (id(client), self.volume_name, env)
        with _volumes_lock:
            vol = _volumes.get(key)
        if vol is None:
            vol = modal_api.volume(self.volume_name, client, env)
            with _volumes_lock:
                _volumes[key] = vol
        return vol

    # -- sync API -----------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """The file's bytes; FileNotFoundError naming the volume and path if absent."""
        key = self.volume_path(path)
        mount = self._mount()
        try:
            if mount is not None:
                return Path(mount, key.lstrip("/")).read_bytes()
            from prefect_modal.core import modal_api

            return modal_api.volume_read(self._volume(), key)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No file {key!r} in Modal Volume {self.volume_name!r}."
            ) from None

    def write_bytes(self, path: str, content: bytes) -> str:
        """Write (or replace) a file; returns its path in the volume."""
        key = self.volume_path(path)
        mount = self._mount()
        if mount is not None:
            target = Path(mount, key.lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
            _sync(mount)
        else:
            from prefect_modal.core import modal_api

            modal_api.volume_write(self._volume(), key, bytes(content))
        return key

    def list(self, path: str = "", recursive: bool = False) -> list[str]:
        """Paths (relative to `base_path`) of the files and folders under `path`."""
        from prefect_modal.core import modal_api

        key = self.volume_path(path)
        base = self.volume_path("")
        entries = modal_api.volume_list(self._volume(), key, recursive=recursive)
        return [posixpath.relpath("/" + p.lstrip("/"), base) for p, _, _ in entries]

    def remove(self, path: str, recursive: bool = False) -> None:
        from prefect_modal.core import modal_api

        modal_api.volume_remove(self._volume(), self.volume_path(path), recursive=recursive)

    # -- Prefect's filesystem contract --------------------------------------------
    # Each method has an async twin (`aread_path`...) and dispatches to it when
    # awaited, as Prefect's own blocks do: the result store calls the sync one
    # with `_sync=True` and the async one by its `a` name.

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_bytes, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]
        return self.read_bytes(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_bytes, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]
        return self.write_bytes(path, content)

    async def aget_directory(
        self, from_path: str | None = None, local_path: str | None = None
    ) -> None:
        await anyio.to_thread.run_sync(self._get_directory, from_path or "", local_path or ".")

    @async_dispatch(aget_directory)
    def get_directory(  # type: ignore[override]
        self, from_path: str | None = None, local_path: str | None = None
    ) -> None:
        """Copy a folder of the volume (default: `base_path`) into `local_path` (default: cwd)."""
        self._get_directory(from_path or "", local_path or ".")

    def _get_directory(self, from_path: str, local_path: str) -> None:
        from prefect_modal.core import modal_api

        vol, root = self._volume(), self.volume_path(from_path)
        for path, is_dir, _ in modal_api.volume_list(vol, root, recursive=True):
            rel = posixpath.relpath("/" + path.lstrip("/"), root)
            dest = Path(local_path, rel)
            if is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(modal_api.volume_read(vol, "/" + path.lstrip("/")))

    async def aput_directory(
        self,
        local_path: str | None = None,
        to_path: str | None = None,
        ignore_file: str | None = None,
    ) -> int:
        return await anyio.to_thread.run_sync(self._put_directory, local_path, to_path)

    @async_dispatch(aput_directory)
    def put_directory(  # type: ignore[override]
        self,
        local_path: str | None = None,
        to_path: str | None = None,
        ignore_file: str | None = None,
    ) -> int:
        """Upload a local folder (default: cwd) into the volume; returns the file count.

        `ignore_file` is not applied: upload a folder that holds only what runs need.
        """
        return self._put_directory(local_path, to_path)

    def _put_directory(self, local_path: str | None, to_path: str | None) -> int:
        from prefect_modal.core import modal_api

        source = Path(local_path or ".")
        count = sum(1 for p in source.rglob("*") if p.is_file())
        modal_api.volume_put_directory(self._volume(), str(source), self.volume_path(to_path or ""))
        return count


def _sync(mount: str) -> None:
    """Ask for a mounted volume's changes to be persisted now (Modal commits a
    sandbox's volume writes on ``sync``; locally the directory is live)."""
    if shutil.which("sync") is None:
        return
    try:
        subprocess.run(["sync", mount], check=False, timeout=60, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pass


async def default_result_storage() -> ModalVolume:
    """The block ad-hoc calls use when neither the flow nor the pool names result storage.

    Saved under `DEFAULT_RESULTS_BLOCK` (kept if it exists) so that the result
    record can point at it and the caller can load it back.
    """
    try:
        block = await ModalVolume.aload(DEFAULT_RESULTS_BLOCK)
        if isinstance(block, ModalVolume):
            return block
    except ValueError:
        pass
    block = ModalVolume(volume_name=DEFAULT_RESULTS_VOLUME)
    await block.asave(DEFAULT_RESULTS_BLOCK, overwrite=False)
    return block
