"""`InFlight`: what a worker process knows of a flow run whose sandbox it watches.

Shared by the worker, which starts and follows sandboxes, and the watcher in
`reconcile.py`, which adopts the sandboxes of runs nobody watches; a module of
its own so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_modal.core.targets import Target
    from prefect_modal.worker.job_configuration import ModalWorkerJobConfiguration


@dataclass
class InFlight:
    """A flow run whose sandbox this worker process is watching."""

    flow_run_id: UUID
    configuration: ModalWorkerJobConfiguration | None = None
    target: Target | None = None
    sandbox: Any = None
    sandbox_id: str | None = None
    adopted: bool = False
    secret_values: tuple[str, ...] = ()
    tail: Any = None
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    cancel_started: bool = False
    cancelled_by_worker: bool = False
    reaped: bool = False  # terminated by the watcher after its run was final
    events: Any = None  # events.SandboxEvents of the sandbox, once it is known
    flow_run: FlowRun | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    cancel_done: anyio.Event = field(default_factory=anyio.Event)
    exit_code: int | None = None
