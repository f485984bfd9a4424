"""What the local server tells the outside world about a sandbox.

`SandboxRecord` is the public, secret-free view of a sandbox: tests read it from
`LocalModal.sandboxes()`, and the CLI reads the same data from
``<state_dir>/sandboxes.json``. It carries env and secret *names* only; secret
values live in the sandbox process's environment and nowhere else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
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
    #: the host pid the server reaches the container through, its monitor (None: not
    #: isolated, or not up yet); its pid_for_children is the sandbox's PID namespace
    init_pid: int | None = None
    isolated: bool = False
    #: the limits its cgroup enforced: memory_mib, cpu (cores), pids (`runtime.cgroups`);
    #: empty when none were enforced
    limits: dict[str, float] = field(default_factory=dict)
    #: why it ended, when the exit code does not say it all (out of memory: exit 137)
    exit_reason: str | None = None
    #: the most memory its processes held at once (cgroup accounting), MiB
    memory_peak_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies, and the listing is rewritten on every change
        d = {name: getattr(self, name) for name in _FIELDS}
        d["tags"], d["volumes"] = dict(self.tags), dict(self.volumes)
        d["limits"] = dict(self.limits)
        d["env_names"], d["secret_names"] = list(self.env_names), list(self.secret_names)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_FIELDS = tuple(f.name for f in fields(SandboxRecord))


def record_json(record: SandboxRecord) -> str:
    """One record as JSON text: the unit `write_listing` joins (and callers may cache)."""
    return json.dumps(record.to_dict())


def write_listing(path: Path, records: list[str]) -> None:
    """Atomically replace ``path`` with the listing of ``records``, each as `record_json`
    made it (readers never see half a file).  Callers encode, so they can cache: the
    server rewrites the listing on every change, and re-encoding hundreds of unchanged
    records each time made a 200-task map quadratic.
    """
    payload = ('{"sandboxes": [' + ", ".join(records) + "]}").encode()
    # one write at a time (the registry's writer task), so a fixed temp name is enough
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # the caller creates the directory once


def read_listing(path: Path) -> list[SandboxRecord]:
    """Read a listing written by `write_listing` (for the CLI, another process)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [SandboxRecord.from_dict(d) for d in data.get("sandboxes", [])]
