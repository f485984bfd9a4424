"""A session's artifact: the record of what it did, and the queue that writes it.

A session is a Prefect artifact on the run that opened it (the sandbox record
of `core/artifacts.py` plus the commands it ran and the snapshots it took), so the
UI and `prefect-modal status` show it.  The record is rewritten after every
command; one background thread writes it in order, so a command never waits
for an API round trip.  It is created once and then updated in place: a new
version per command would show as one more label on the run's graph.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import copy_context
from uuid import UUID

from pydantic import Field

from prefect_modal.core.artifacts import (
    KEY_PREFIX,
    SandboxArtifact,
    update_sandbox_artifact,
    write_sandbox_artifact,
)

#: Commands listed in a session's artifact (the latest ones).
COMMANDS_KEPT = 50
#: Characters of one command shown in the artifact.
COMMAND_CHARS = 200
#: Artifact keys of sessions: under the sandbox prefix, so `status` reads them too.
SESSION_KEY_PREFIX = f"{KEY_PREFIX}session-"

logger = logging.getLogger("prefect_modal.sessions")


class SessionRecord(SandboxArtifact):
    """A session's artifact: the sandbox record plus what the session did."""

    session: bool = True
    keep: bool = False
    image: str | None = None
    restored_from: str | None = None
    commands: list[str] = Field(default_factory=list)
    snapshots: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        # One artifact per session (a task may open several); keys are ^[a-z0-9-]*$
        # and base62 sandbox ids are case-sensitive, hence a digest.
        digest = hashlib.sha256(self.sandbox_id.encode()).hexdigest()[:32]
        return f"{SESSION_KEY_PREFIX}{digest}"

    def description(self) -> str:
        exit_text = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        lifetime = (
            "ends with its flow run (keep=True)"
            if self.keep
            else "ends with its task run or `with` block"
        )
        where = f" See: `{self.link}`." if self.link else ""
        run = f" `prefect-modal status {self.flow_run_id}`." if self.flow_run_id else ""
        return (
            f"Sandbox session `{self.sandbox_id}` ({self.status}{exit_text}) in app "
            f"`{self.app_name}` on {self.target}; {len(self.commands)} command(s), "
            f"{len(self.snapshots)} snapshot(s); {lifetime}.{where}{run}"
        )


class ArtifactQueue:
    """Writes session records in the background, in order (one API call each)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-modal-session")
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []
        #: The artifact of each session key, once created (only the writer thread uses it).
        self._ids: dict[str, UUID] = {}

    def write(self, record: SessionRecord) -> Future[None]:
        snapshot = record.model_copy(deep=True)
        future = self._pool.submit(copy_context().run, self._write_record, snapshot)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def flush(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                return

    def _write_record(self, record: SessionRecord) -> None:
        try:
            artifact_id = self._ids.get(record.key)
            if artifact_id is None:
                self._ids[record.key] = write_sandbox_artifact(record)
            else:
                update_sandbox_artifact(artifact_id, record)
            if record.status != "running":  # its last write
                self._ids.pop(record.key, None)
        except Exception as exc:  # a record is for people; never fail the session for it
            logger.warning(
                "prefect-modal: could not write the artifact of %s: %s", record.sandbox_id, exc
            )


#: The one queue of this process: every session's records, in order.
artifact_queue = ArtifactQueue()
