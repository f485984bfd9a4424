"""Sandbox lifecycle as Prefect events: ``prefect-modal.sandbox.<what>``.

Prefect's own integrations report their infrastructure this way
(prefect-docker emits ``prefect.docker.container.*``): the events show in the
UI's Event Feed next to the run's own, and Automations can react to them, e.g.
notify when a sandbox exits with 137 (killed: out of memory or terminated).

Every sandbox the task runner, the worker or a session starts emits:

* ``created``: the sandbox exists (its id is known);
* ``running``: its command runs (for a per-step call: the call was sent);
* ``exited``: its command ended; the resource carries the exit code
  (``modal.sandbox.exit-code``) and the reason (``modal.sandbox.reason``:
  succeeded, failed, timed out, terminated, crashed), the payload the seconds
  and the estimated cost;
* ``terminated``: we ended it (a cancelled run, a task timeout, a run that
  ended while its sandbox lingered).

The resource is ``modal.sandbox.<sandbox id>`` with labels for its app, GPU,
CPU, memory and image; related resources are the flow run, task run, flow,
deployment and work pool, as each applies (Prefect's roles and ids, so the
UI links them).  Emission goes through `prefect.events.emit_event`, which
queues the event for Prefect's events worker: it is batched onto one
websocket, so an event costs no request of its own, and a failure to emit
never fails a run.  Nothing here imports `modal`; sessions call the same
functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal
from uuid import UUID

EVENT_PREFIX = "prefect-modal.sandbox."
RESOURCE_PREFIX = "modal.sandbox."

SandboxEvent = Literal["created", "running", "exited", "terminated"]
ExitReason = Literal["succeeded", "failed", "timed out", "terminated", "crashed"]

#: Record statuses (`artifacts.SandboxStatus`) as the reasons of an ``exited`` event.
_REASONS: dict[str, ExitReason] = {
    "succeeded": "succeeded",
    "failed": "failed",
    "timeout": "timed out",
    "terminated": "terminated",
    "crashed": "crashed",
}

logger = logging.getLogger("prefect_modal.events")


def exit_reason(status: str | None, exit_code: int | None) -> ExitReason:
    """The reason of an ``exited`` event from a record's final status (or its exit code)."""
    if status in _REASONS:
        return _REASONS[status]
    if exit_code == 0:
        return "succeeded"
    if exit_code == 124:
        return "timed out"
    if exit_code == 137:
        return "terminated"
    return "crashed" if exit_code is None else "failed"


def sandbox_resource(
    sandbox_id: str,
    *,
    name: str | None = None,
    app: str | None = None,
    resources: dict[str, Any] | None = None,
    target: str | None = None,
    mode: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The event's resource: id ``modal.sandbox.<id>`` and string labels.

    Labels are strings (Prefect matches them as text in automation triggers);
    a CPU-only sandbox's GPU label is ``none`` so a trigger can ask for it.
    """
    res = resources or {}
    labels: dict[str, Any] = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{sandbox_id}",
        "prefect.resource.name": name or sandbox_id,
        "modal.sandbox.id": sandbox_id,
        "modal.sandbox.app": app or res.get("app_name"),
        "modal.sandbox.gpu": res.get("gpu") or "none",
        "modal.sandbox.cpu": res.get("cpu"),
        "modal.sandbox.memory": res.get("memory_mib"),
        "modal.sandbox.image": res.get("image"),
        "modal.sandbox.target": target,
        "modal.sandbox.mode": mode,
        **(extra or {}),
    }
    return {k: str(v) for k, v in labels.items() if v is not None}


def related_resources(
    *,
    flow_run_id: UUID | str | None = None,
    task_run_id: UUID | str | None = None,
    flow_id: UUID | str | None = None,
    deployment_id: UUID | str | None = None,
    work_pool_id: UUID | str | None = None,
    names: dict[str, str | None] | None = None,
) -> list[dict[str, str]]:
    """Prefect's related resources (``prefect.flow-run.<id>`` with role ``flow-run``, ...).

    `names` maps a role to the object's name, shown by the UI next to the link.
    """
    names = names or {}
    out: list[dict[str, str]] = []
    for role, value in (
        ("flow-run", flow_run_id),
        ("task-run", task_run_id),
        ("flow", flow_id),
        ("deployment", deployment_id),
        ("work-pool", work_pool_id),
    ):
        if value is None:
            continue
        item = {"prefect.resource.id": f"prefect.{role}.{value}", "prefect.resource.role": role}
        if names.get(role):
            item["prefect.resource.name"] = str(names[role])
        out.append(item)
    return out


def emit_sandbox_event(
    what: SandboxEvent,
    resource: dict[str, str],
    related: Iterable[dict[str, str]] = (),
    payload: dict[str, Any] | None = None,
    follows: Any = None,
) -> Any:
    """Queue one event; returns Prefect's Event (or None when events are off or it failed).

    Never raises: an event is for people and automations, the sandbox is what matters.
    """
    try:
        from prefect.events import emit_event

        return emit_event(
            event=f"{EVENT_PREFIX}{what}",
            resource=resource,
            related=list(related),
            payload=payload or {},
            follows=follows,
        )
    except Exception as exc:  # pragma: no cover - Prefect refuses only malformed events
        logger.warning("prefect-modal: could not emit %s%s: %s", EVENT_PREFIX, what, exc)
        return None


def exited_labels(exit_code: int | None, reason: ExitReason) -> dict[str, Any]:
    """The labels an ``exited`` event adds to the resource, for automation triggers."""
    return {
        "modal.sandbox.exit-code": "none" if exit_code is None else exit_code,
        "modal.sandbox.reason": reason,
    }


class SandboxEvents:
    """The events of one sandbox, each following the previous one (Prefect's ``follows``).

    Build one when the sandbox exists; call `created`, `running`, `exited`,
    `terminated` as it goes.  Thread-safe enough for our use: each method is
    called from one thread at a time per sandbox.
    """

    def __init__(
        self,
        sandbox_id: str,
        *,
        name: str | None = None,
        app: str | None = None,
        resources: dict[str, Any] | None = None,
        target: str | None = None,
        mode: str | None = None,
        related: list[dict[str, str]] | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self._resource_args: dict[str, Any] = dict(
            name=name, app=app, resources=resources, target=target, mode=mode
        )
        self.related = related or []
        self._last: Any = None
        self.exited_sent = False
        self.terminated_sent = False

    def _emit(
        self, what: SandboxEvent, payload: dict[str, Any] | None = None, **labels: Any
    ) -> Any:
        resource = sandbox_resource(self.sandbox_id, **self._resource_args, extra=labels)
        event = emit_sandbox_event(what, resource, self.related, payload, follows=self._last)
        if event is not None:
            self._last = event
        return event

    def created(self) -> Any:
        return self._emit("created")

    def running(self) -> Any:
        return self._emit("running")

    def exited(
        self,
        exit_code: int | None,
        reason: ExitReason,
        seconds: float | None = None,
        estimated_cost_usd: float | None = None,
    ) -> Any:
        if self.exited_sent:
            return None
        self.exited_sent = True
        payload = {
            "exit_code": exit_code,
            "reason": reason,
            "seconds": None if seconds is None else round(seconds, 3),
            "estimated_cost_usd": estimated_cost_usd,
        }
        return self._emit("exited", payload, **exited_labels(exit_code, reason))

    def terminated(self, why: str) -> Any:
        if self.terminated_sent:
            return None
        self.terminated_sent = True
        return self._emit("terminated", {"why": why})


def for_record(record: Any, related: list[dict[str, str]] | None = None) -> SandboxEvents:
    """The events of the sandbox a `SandboxArtifact` describes (runner, worker, sessions)."""
    return SandboxEvents(
        record.sandbox_id,
        name=record.sandbox_name,
        app=record.app_name,
        resources=record.resources,
        target=record.target,
        mode=record.mode,
        related=related
        if related is not None
        else related_resources(flow_run_id=record.flow_run_id, task_run_id=record.task_run_id),
    )
