"""Per-step results too large for the output stream travel by reference on a Modal Volume.

A sandbox sends its task's pickled return value back on its output stream,
which is capped (`ModalTaskRunner(max_result_bytes=...)`, 32 MiB by default):
a stream of base64 is the wrong pipe for a model or a data frame.  When the
call has a result volume, the sandbox instead writes the pickle to that
volume, which is mounted in the task's sandbox, and sends back a small
handle (path, size, sha256).  The flow process reads the file back through
the Volume API, checks it against the handle, removes it, and hands the value
to Prefect's engine, which persists it with the task's result storage as
usual: when that storage is the same `ModalVolume` (the common set-up), the
task's result record lives on the volume too.

Which volume (first that applies):

1. ``ModalTaskRunner(result_volume=...)``: a `ModalVolume` block or a volume name;
2. the task's result storage, when it is a `ModalVolume` block
   (``@task(result_storage=...)``, or the flow's ``result_storage=`` that tasks
   inherit).

Without one, an oversized result fails the task with the size and the fix, as
before.  A call's pickled arguments over `call.MAX_STDIN_PAYLOAD_BYTES` go the
same way in (``args-<nonce>.pkl``, read by the bootstrap from the mount);
without a volume such a call fails before any sandbox starts.  Nothing here
imports `modal`: the Volume API goes through the block (`storage.py` ->
`core/modal_api.py`).
"""

from __future__ import annotations

import binascii
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

from prefect_modal.core.errors import PrefectModalError
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.storage import ModalVolume, mount_path_for

#: Folder (under the block's `base_path`) that holds results in transit.
REF_DIR = "prefect-modal/refs"


class ResultReferenceError(PrefectModalError, RuntimeError):
    """A result sent by reference could not be read back intact."""


@dataclass(frozen=True)
class ResultVolume:
    """Where one call's oversized result goes: the block and its mount in the sandbox."""

    block: ModalVolume
    mount: str

    @classmethod
    def for_spec(cls, block: ModalVolume, spec: SandboxSpec) -> ResultVolume:
        """Reuse a mount the spec already has for this volume, else our own path."""
        for path, name in (spec.volumes or {}).items():
            if name == block.volume_name:
                return cls(block=block, mount=path)
        return cls(block=block, mount=mount_path_for(block.volume_name))

    def spec_with_mount(self, spec: SandboxSpec) -> SandboxSpec:
        if (spec.volumes or {}).get(self.mount) == self.block.volume_name:
            return spec
        return spec.merged_with(SandboxSpec(volumes={self.mount: self.block.volume_name}))

    def sandbox_dir(self) -> str:
        """The folder, in the sandbox, the bootstrap writes results to."""
        return posixpath.join(self.mount, self.block.volume_path(REF_DIR).lstrip("/"))

    def header_value(self) -> str:
        """`sandbox_dir` for the call header (hex: header words cannot hold spaces)."""
        return binascii.hexlify(self.sandbox_dir().encode("utf-8")).decode("ascii")

    def write_argument(self, nonce: str, payload: bytes) -> str:
        """Put a call's payload too large for stdin on the volume; the file's path in the
        sandbox for the call header (hex).  The flow process removes it after the call."""
        name = f"args-{nonce}.pkl"
        self.block.write_bytes(posixpath.join(REF_DIR, name), payload)
        path = posixpath.join(self.sandbox_dir(), name)
        return binascii.hexlify(path.encode("utf-8")).decode("ascii")

    def remove_argument(self, nonce: str) -> None:
        try:
            self.block.remove(posixpath.join(REF_DIR, f"args-{nonce}.pkl"))
        except Exception:  # a leftover file is harmless
            pass

    def read(self, handle: bytes) -> Any:
        """The value a REF frame points at, checked against its size and sha256."""
        fields = dict(word.split("=", 1) for word in handle.decode("ascii").split() if "=" in word)
        name = fields.get("name", "")
        if not name or "/" in name or name.startswith("."):
            raise ResultReferenceError(f"the sandbox sent a malformed result handle: {fields!r}")
        path = posixpath.join(REF_DIR, name)
        where = f"{self.block.volume_path(path)!r} on Modal Volume {self.block.volume_name!r}"
        data = self.block.read_bytes(path)
        if len(data) != int(fields.get("size", -1)):
            raise ResultReferenceError(
                f"the task's result {where} is {len(data)} bytes, the sandbox wrote "
                f"{fields.get('size')}: the volume did not get the whole file"
            )
        if hashlib.sha256(data).hexdigest() != fields.get("sha256"):
            raise ResultReferenceError(f"the task's result {where} does not match its sha256")
        try:
            self.block.remove(path)
        except Exception:  # a leftover file is harmless; the value is here
            pass
        import cloudpickle

        return cloudpickle.loads(data)


def resolve(
    setting: ModalVolume | str | None, credentials: Any, task_ctx: Any
) -> ModalVolume | None:
    """The result volume of one task call (see the module's docstring for the order)."""
    if isinstance(setting, ModalVolume):
        return setting
    if isinstance(setting, str) and setting:
        return ModalVolume(volume_name=setting, modal_credentials=credentials)
    storage = getattr(getattr(task_ctx, "task", None), "result_storage", None)
    if isinstance(storage, ModalVolume):
        return storage
    store = getattr(task_ctx, "result_store", None)
    storage = getattr(store, "result_storage", None)
    return storage if isinstance(storage, ModalVolume) else None


def check_setting(value: Any) -> ModalVolume | str | None:
    """`ModalTaskRunner(result_volume=...)`: a block, a valid volume name, or None."""
    if value is None or isinstance(value, ModalVolume):
        return value
    if isinstance(value, str):
        try:
            ModalVolume(volume_name=value)  # the block's own name rule
        except ValueError:
            raise ValueError(
                f"result_volume={value!r} is not a Modal Volume name: use 1 to 64 letters, "
                "digits, '.', '_' or '-', or pass a ModalVolume block."
            ) from None
        return value
    raise TypeError(
        f"result_volume={value!r}: pass a ModalVolume block or a Modal Volume name "
        f"(got {type(value).__name__})."
    )


__all__ = ["REF_DIR", "ResultReferenceError", "ResultVolume", "check_setting", "resolve"]
