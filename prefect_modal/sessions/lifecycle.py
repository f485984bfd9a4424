"""Ending sessions with the runs that own them, and the sessions this process holds.

A session ends with its ``with`` block, else with its task run (``keep=False``)
or its flow run (``keep=True``).  Nothing in Prefect tells a process that one
of its runs ended, so one watcher thread per flow run with sessions asks the
Prefect API for the owning runs' states and ends the sessions whose owner is
final (or cancelling); a cancelled flow run also ends them through the
registry the task runner uses for its own sandboxes (`core.cancellation`).
The sandbox's lifetime (``spec.timeout``) is the backstop for a process that died.
"""

from __future__ import annotations

import logging
import threading
import time
from contextvars import copy_context
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect_modal.core.cancellation import CallRegistry, registry_for

if TYPE_CHECKING:
    from prefect_modal.sessions.session import SandboxSession

#: How often the watcher asks the Prefect API whether a session's owning run ended.
WATCH_INTERVAL_SECONDS = 1.0
#: The registry sessions use when the flow's task runner is not a ModalTaskRunner.
SESSIONS_FAMILY = "prefect-modal-sessions"

logger = logging.getLogger("prefect_modal.sessions")

#: The sessions this process opened and has not ended, by session id.
live_sessions: dict[str, SandboxSession] = {}
_watch_lock = threading.Lock()
_watched: dict[UUID, set[SandboxSession]] = {}


def register(session: SandboxSession) -> CallRegistry:
    """Register `session` where its flow run's cancellation ends it: its
    ModalTaskRunner's registry, else the sessions' own; returns that registry."""
    runner = session._run.runner
    registry = runner.cancellation if runner is not None else registry_for(SESSIONS_FAMILY)
    registry.add(session)
    return registry


def watch(session: SandboxSession) -> None:
    """Follow the session's owning runs: one watcher thread per flow run with sessions."""
    flow_run_id = session._run.flow_run_id
    assert flow_run_id is not None
    with _watch_lock:
        sessions = _watched.get(flow_run_id)
        if sessions is not None:
            sessions.add(session)
            return
        _watched[flow_run_id] = {session}
    thread = threading.Thread(
        target=copy_context().run,
        args=(_watch_flow_run, flow_run_id),
        name=f"prefect-modal-sessions-{flow_run_id}",
        daemon=True,
    )
    thread.start()


def _owner_ended(state: Any) -> bool:
    return state is None or state.is_final() or state.is_cancelling()


def _close(client: Any) -> None:
    """Close the watcher's Prefect client; a broken one may fail to close, which is fine."""
    try:
        client.__exit__(None, None, None)
    except Exception:
        pass


def _watch_flow_run(flow_run_id: UUID) -> None:
    """End the flow run's sessions when it ends (any way), and each unkept session
    of a task when that task run is final."""
    from prefect.client.orchestration import get_client

    client: Any = None
    while True:
        with _watch_lock:
            sessions = {s for s in _watched.get(flow_run_id, set()) if not s.ended}
            if not sessions:
                _watched.pop(flow_run_id, None)
                break
            _watched[flow_run_id] = sessions
        try:
            if client is None:
                client = get_client(sync_client=True)
                client.__enter__()
            flow_state = client.read_flow_run(flow_run_id).state
            if _owner_ended(flow_state):
                why = f"its flow run is {flow_state.name if flow_state else 'gone'}"
                threads = [t for s in sessions if (t := s.cancel(why)) is not None]
                for thread in threads:
                    thread.join(timeout=30)
                continue
            tasks = {s._run.task_run_id for s in sessions if not s.keep and s._run.task_run_id}
            for task_run_id in tasks:
                assert task_run_id is not None
                state = client.read_task_run(task_run_id).state
                if state is not None and state.is_final():
                    why = f"its task run is {state.name}"
                    for s in sessions:
                        if s._run.task_run_id == task_run_id and not s.keep:
                            s.cancel(why)
        except Exception as exc:  # the API may hiccup; the sandbox timeout is the backstop
            logger.debug("prefect-modal: session watcher of %s: %s", flow_run_id, exc)
            if client is not None:
                _close(client)
                client = None
        time.sleep(WATCH_INTERVAL_SECONDS)
    if client is not None:
        _close(client)


def sessions_of_this_process() -> list[SandboxSession]:
    """The sessions this process opened and has not ended (for tests and tools)."""
    return list(live_sessions.values())
