"""Where a session runs: the Prefect run around it, its logger, and the Modal it reaches.

A session belongs to the task run (or flow run) that opened it: its tags,
artifact and lifetime come from that run, its command output goes to that
run's logs, and which Modal it runs on follows the same rule as the task
runner's (credentials, else Modal's config, else the local server), refused
clearly where no Modal can be reached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from prefect_modal.core.cancellation import HasCancellation
from prefect_modal.core.credentials import ModalCredentials, ambient_credentials_present
from prefect_modal.sessions.errors import SessionUnavailableError

if TYPE_CHECKING:
    from prefect_modal.core.targets import Target

logger = logging.getLogger("prefect_modal.sessions")


@dataclass
class RunInfo:
    flow_run_id: UUID | None = None
    task_run_id: UUID | None = None
    task_name: str | None = None
    #: The flow's task runner when it is a ModalTaskRunner (its registry ends us).
    runner: HasCancellation | None = None


def current_run() -> RunInfo:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return RunInfo()
    task_ctx = TaskRunContext.get()
    flow_ctx = FlowRunContext.get()
    info = RunInfo()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        info.flow_run_id = flow_ctx.flow_run.id
        runner = flow_ctx.task_runner
        if isinstance(runner, HasCancellation):
            info.runner = runner
    if task_ctx is not None:
        info.task_run_id = task_ctx.task_run.id
        info.task_name = task_ctx.task.name
        info.flow_run_id = info.flow_run_id or task_ctx.task_run.flow_run_id
    return info


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The current run's logger (task run, else flow run), else the sessions' logger."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging.loggers import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger()
    except Exception:
        pass
    return logger


def check_reachable(credentials: ModalCredentials | None) -> None:
    """Refuse clearly inside a sandbox that cannot reach Modal (a per-step task's).

    Such a sandbox has no Modal token, and resolving a target there would start a
    local Modal server *inside the sandbox*: never what anyone wants.
    """
    inside = os.environ.get("MODAL_SANDBOX_ID") or os.environ.get("MODAL_TASK_ID")
    if not inside:
        return
    if (credentials is not None and credentials.has_token) or ambient_credentials_present():
        return
    raise SessionUnavailableError(
        f"SandboxSession: this code runs inside Modal sandbox {inside}, which has no Modal "
        "credentials, so it cannot open or attach to a session. A task that drives sessions "
        "should run in the flow's process: mark it @modal_options(local=True) under a "
        "ModalTaskRunner, or open the session in the flow body; or pass "
        "credentials=ModalCredentials.load(...) to reach Modal from inside the sandbox."
    )


def target(credentials: ModalCredentials | None) -> Target:
    """The Modal a session runs on (after `check_reachable`)."""
    from prefect_modal.core.targets import resolve_target

    check_reachable(credentials)
    return resolve_target(credentials)
