"""The record of a warm sandbox: one artifact per sandbox, listing the task runs it served.

A cold per-step call writes one artifact for its task run.  A warm sandbox
serves many task runs one after another, and one artifact per task run would
cost the Prefect API server more CPU than the calls themselves in a map of
small tasks (measured at 200 warm calls: turning those writes off cut the
server's CPU from 10.6 s to 3.2 s and the map's wall time threefold).  So a
warm sandbox has one artifact, keyed by its id and attached to the flow run,
whose `calls` list the task runs it served in order (`SandboxArtifact.calls`;
`call_views()` turns it into one record per task run for the other
direction).  Each task run's own log says which sandbox served it.

It is written once the sandbox has run `RUNNING_RECORD_AFTER_S` (so the UI
and `prefect-modal status` see a live sandbox), again at most every
`UPDATE_EVERY_S` while calls start and end, and once when the sandbox ends;
its final version joins the flow run's table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import Context, copy_context
from datetime import datetime, timezone
from uuid import UUID

from prefect_modal import events
from prefect_modal.core.artifacts import CallEntry, SandboxArtifact, SandboxStatus
from prefect_modal.task_runner.artifact_writer import ArtifactWriter

#: Least seconds between two writes of one warm sandbox's record while it runs.
UPDATE_EVERY_S = 10.0

#: Exit codes of a sandbox ended from outside (SIGKILL) and of one that reached its
#: lifetime, as the per-call records read them.
_KILLED, _LIFETIME = 137, 124


class WarmRecord:
    """Keeps one warm sandbox's record and writes it, throttled, as its calls go."""

    def __init__(
        self,
        record: SandboxArtifact,
        writer: ArtifactWriter,
        on_final: Callable[[SandboxArtifact], None],
        first_write_after: float,
    ) -> None:
        self._record = record.model_copy(update={"calls": [], "status": "running"})
        self._writer = writer
        self._on_final = on_final
        # Prefect's settings (the API URL) live in context variables; the timer and
        # the sandbox's exit watcher run in threads of their own.
        self._context = _flow_run_context()
        self._lock = threading.Lock()
        self._dirty = True
        self._final = False
        self._next_write = time.monotonic() + first_write_after
        self._timer: threading.Timer | None = None
        self._schedule()
        # The sandbox's own events, once each: created now, exited at its end (a call
        # emits `running` with its task run, and `terminated` when it ended the sandbox).
        self._events = events.for_record(self._record)
        self._context.copy().run(self._events.created)

    # -- what happens in the sandbox -----------------------------------------------

    def call_began(
        self, call: int, task_run_id: UUID | None, task_name: str | None, attempt: int | None
    ) -> None:
        with self._lock:
            if self._final:
                return
            calls = self._record.calls if self._record.calls is not None else []
            calls.append(
                CallEntry(call=call, task_run_id=task_run_id, task_name=task_name, attempt=attempt)
            )
            names = list(dict.fromkeys(c.task_name for c in calls if c.task_name))
            self._record.calls = calls
            self._record.task_name = ", ".join(names) or None
            self._changed()

    def call_ended(self, call: int, status: SandboxStatus) -> None:
        with self._lock:
            if self._final:  # the sandbox's end already settled its running calls
                return
            for entry in self._record.calls or []:
                if entry.call == call:
                    entry.status, entry.ended_at = status, _now()
            self._changed()

    def sandbox_ended(self, returncode: int | None, terminated: bool) -> SandboxArtifact:
        """The sandbox exited: its final record is written and handed to the runner."""
        with self._lock:
            if self._final:
                return self._record
            self._final = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            status = _final_status(returncode, terminated)
            now = _now()
            for entry in self._record.calls or []:
                if entry.status == "running":  # the call the sandbox's end cut short
                    entry.status, entry.ended_at = status, now
            self._record.status, self._record.exit_code = status, returncode
            self._record.ended_at = now
            final = self._record.model_copy(deep=True)
        self._writer.write(final, context=self._context)
        self._on_final(final)
        self._context.copy().run(
            self._events.exited,
            returncode,
            events.exit_reason(status, returncode),
            final.seconds,
            final.estimated_cost(),
        )
        return final

    def snapshot(self) -> SandboxArtifact:
        with self._lock:
            return self._record.model_copy(deep=True)

    # -- throttled writes ----------------------------------------------------------

    def _changed(self) -> None:
        """Called with the lock held."""
        self._dirty = True
        self._schedule()

    def _schedule(self) -> None:
        """Called with the lock held (or from `__init__`)."""
        if self._timer is not None or self._final:
            return
        delay = max(0.0, self._next_write - time.monotonic())
        self._timer = threading.Timer(delay, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        with self._lock:
            self._timer = None
            if self._final or not self._dirty:
                return
            self._dirty = False
            self._next_write = time.monotonic() + UPDATE_EVERY_S
            snapshot = self._record.model_copy(deep=True)
        self._writer.write(snapshot, wanted=lambda: not self._final, context=self._context)


def _flow_run_context() -> Context:
    """This thread's context without its task run: the sandbox was started for one
    call but serves the flow run, and Prefect's events worker relates an event to the
    task run of the context it was emitted in."""
    context = copy_context()
    try:
        from prefect.context import TaskRunContext

        context.run(TaskRunContext.__var__.set, None)  # type: ignore[arg-type]
    except Exception:  # no Prefect run context to leave out
        pass
    return context


def _final_status(returncode: int | None, terminated: bool) -> SandboxStatus:
    """A warm sandbox ends with exit 0 when it is let go (idle, or the flow run
    ended); terminated when we (or a cancel) killed it; otherwise it crashed."""
    if returncode == 0:
        return "succeeded"
    if terminated or returncode == _KILLED:
        return "terminated"
    if returncode == _LIFETIME:
        return "timeout"
    return "crashed"


def _now() -> datetime:
    return datetime.now(timezone.utc)


__all__ = ["UPDATE_EVERY_S", "WarmRecord"]
