"""Writes sandbox records to Prefect in the background, in order, on one client.

A record is written when a sandbox starts and again when it ends; on a task's
critical path that would be API round trips per task, so one thread writes
them while the tasks go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import Context, copy_context
from typing import Any

from prefect_modal.core.artifacts import SandboxArtifact, write_sandbox_artifact

logger = logging.getLogger("prefect_modal.task_runner")


class ArtifactWriter:
    """Writes sandbox records to Prefect in the background, in order.

    A record is written when a sandbox starts and again when it ends; on the
    task's critical path that would be two API round trips per task, so one
    thread writes them while the task goes on, and `flush()` waits at the end
    of the flow run.  That thread keeps one Prefect client open between writes
    (opening a client costs ~30 ms of CPU, ten times a write, and the flow
    process's CPU is what a map of small tasks waits on); `flush()` closes it.
    A failed write is logged, never fatal to a task.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-modal-artifacts")
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()
        # owned by the writer thread only
        self._client: Any = None
        self._client_url: str | None = None

    def write(
        self,
        record: SandboxArtifact,
        wanted: Callable[[], bool] | None = None,
        context: Context | None = None,
    ) -> None:
        """Queue a write; ``wanted`` is asked again just before it is sent (a "running"
        record whose sandbox has finished meanwhile is not worth an API call).
        Prefect's settings (the API URL) live in context variables: the write runs in
        a copy of ``context``, or of the caller's when none is given."""
        snapshot = record.model_copy(deep=True)
        context = context.copy() if context is not None else copy_context()
        self._submit(context.run, self._write, snapshot, wanted)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        future = self._pool.submit(fn, *args)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _open_client(self) -> Any:
        """The writer thread's client, for the API URL of the record's context."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if self._client is None or url != self._client_url:
            self._close_client()
            client = get_client(sync_client=True)
            client.__enter__()
            self._client, self._client_url = client, url
        return self._client

    def _close_client(self) -> None:
        client, self._client, self._client_url = self._client, None, None
        if client is not None:
            try:
                client.__exit__(None, None, None)
            except Exception:
                pass

    def _write(self, record: SandboxArtifact, wanted: Callable[[], bool] | None = None) -> None:
        if wanted is not None and not wanted():
            return
        try:
            write_sandbox_artifact(record, client=self._open_client())
        except Exception as exc:
            self._close_client()  # a broken connection must not poison the next write
            logger.warning(
                "prefect-modal: could not write the artifact of %s: %s", record.sandbox_id, exc
            )

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every write so far, then let the thread close its client."""
        self._wait(timeout)
        self._submit(self._close_client)
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            for future in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    future.result(timeout=left)
                except Exception:
                    return
