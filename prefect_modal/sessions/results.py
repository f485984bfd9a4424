"""What a session hands back: command results, output lines, directory entries, snapshots.

Plain values with no link to the sandbox or to Prefect, kept apart from the
session so a caller (or a task's result persistence) can hold, compare and
serialize them without a live session; `SandboxSnapshot` in particular crosses
from one task or flow run to another as a task result.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prefect_modal.core.spec import SandboxSpec


@dataclass(frozen=True)
class ExecResult:
    """What one command did: exit code and all of its output, as text."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check_returncode(self) -> ExecResult:
        """Raise `subprocess.CalledProcessError` unless the command exited 0 (as
        `subprocess.CompletedProcess.check_returncode` does); returns self."""
        if self.returncode != 0:
            raise subprocess.CalledProcessError(
                self.returncode, list(self.command), self.stdout, self.stderr
            )
        return self


@dataclass(frozen=True)
class OutputLine:
    """One line a streaming command printed, on `stream` ("stdout" or "stderr")."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class SandboxFile:
    """An entry of `SandboxSession.list_files`."""

    name: str
    path: str
    type: str  # "file", "directory" or "symlink"
    size: int
    modified_time: int


class SandboxSnapshot(BaseModel):
    """A session's filesystem at one moment: start new sessions from it with
    `SandboxSession.restore`.

    Small and JSON-serializable, so it can be a task's result and cross from one
    task (or flow run) to another through Prefect's result persistence.  The
    image it names lives on the Modal it was taken on.  Secret env values are
    not kept (names are, in `secret_env_names`): pass them again in
    ``restore(snapshot, spec=SandboxSpec(env=...))``, or use named Modal secrets.
    """

    model_config = ConfigDict(frozen=True)

    image_id: str = Field(description="Modal image id of the snapshot ('im-...').")
    source_session_id: str = Field(description="The session (sandbox id) it was taken of.")
    spec: SandboxSpec = Field(description="The session's spec, secret env values left out.")
    secret_env_names: list[str] = Field(default_factory=list)
    block_network: bool = False
    target: str = Field(default="modal", description="'local' or 'modal': where the image is.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def spec_without_secrets(spec: SandboxSpec) -> SandboxSpec:
    """The spec a snapshot keeps: secret env values dropped, plain ones kept."""
    data = spec.model_dump(exclude_unset=True)
    if spec.env:
        plain = spec.plain_env()
        data["env"] = plain or None
    return SandboxSpec(**data)
