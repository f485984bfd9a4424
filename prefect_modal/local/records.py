"""What the local server tells the outside world about a sandbox.

`SandboxRecord` is the public, secret-free view of a sandbox: tests read it from
`LocalModal.sandboxes()`, and the CLI reads the same data from
``<state_dir>/sandboxes.json``. It carries env and secret *names* only; secret
values live in the sandbox process's environment and nowhere else.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("running", "exited", "terminated", "timeout")


@dataclass(frozen=True)
class SandboxRecord:
    """A snapshot of one sandbox, safe to print, log or persist."""

    id: str
    name: str | None
    app_id: str
    app_name: str | None
    tags: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None
    cpu: float | None = None
    memory_mib: int | None = None
    region: str | None = None
    cloud: str | None = None
    image: str = ""
    env_names: list[str] = field(default_factory=list)
    secret_names: list[str] = field(default_factory=list)
    workdir: str | None = None
    volumes: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    returncode: int | None = None
    status: str = "running"
    created_at: float = 0.0
    finished_at: float | None = None
    version: int = 2
    task_id: str = ""
    root: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def write_listing(path: Path, records: list[SandboxRecord]) -> None:
    """Atomically replace ``path`` with the JSON listing (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"sandboxes": [r.to_dict() for r in records]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=".sandboxes.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_listing(path: Path) -> list[SandboxRecord]:
    """Read a listing written by `write_listing` (for the CLI, another process)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [SandboxRecord.from_dict(d) for d in data.get("sandboxes", [])]
