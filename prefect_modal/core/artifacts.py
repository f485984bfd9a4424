"""Sandbox records kept as Prefect artifacts.

Prefect keeps artifacts with the run they belong to, shows them in the UI next
to its logs, and serves them to any process with API access.  So a sandbox id
written here is what lets the CLI, a restarted worker, or a person in the UI
find, inspect and cancel a sandbox long after the process that started it is
gone.  Records are table artifacts with one row per field: readable in the UI,
and parsed back by `read_sandbox_artifacts`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
)
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort
from pydantic import BaseModel, Field, field_validator

#: Every key of ours starts with this, so our artifacts can be told apart.
KEY_PREFIX = "modal-sandbox-"
ARTIFACT_TYPE = "table"
_PAGE = 200

SandboxStatus = Literal[
    "starting", "running", "succeeded", "failed", "terminated", "timeout", "crashed", "unknown"
]


#: A pipeline sandbox still running this long after its flow run became final
#: is terminated by the worker (see `worker/reconcile.py`).  Prefect's engine reports
#: the final state a moment before its process exits (it flushes logs and
#: events), so a sandbox may show "running" for a few seconds after its run
#: ended; beyond this grace it is ended, and shown final.
FINAL_GRACE_SECONDS = 10.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


class CallEntry(BaseModel):
    """One task run a warm sandbox served, in the sandbox's record."""

    call: int
    task_run_id: UUID | None = None
    task_name: str | None = None
    attempt: int | None = None
    status: SandboxStatus = "running"
    started_at: datetime = Field(default_factory=_now)
    ended_at: datetime | None = None


class SandboxArtifact(BaseModel):
    """What we remember about one sandbox.  Never holds a secret value.

    A sandbox that served one call (pipeline, session, a per-step call without
    reuse) has its task run in `task_run_id`.  A warm sandbox serves many task
    runs of its flow run, one at a time: its record belongs to the flow run
    and lists them in `calls`, in the order it ran them (`call_views()` gives
    one record per task run, for the task run -> sandbox direction).
    """

    sandbox_id: str
    sandbox_name: str | None = None
    app_name: str
    target: Literal["local", "modal"]
    flow_run_id: UUID | None = None
    task_run_id: UUID | None = None
    task_name: str | None = None
    attempt: int | None = None
    #: In a record of `call_views()`: which call of its warm sandbox the task run was.
    call_in_sandbox: int | None = None
    #: A warm sandbox's calls (None: a sandbox of one call, or of the run itself).
    calls: list[CallEntry] | None = None
    mode: Literal["per_step", "pipeline", "session"]
    resources: dict[str, Any] = Field(default_factory=dict)
    status: SandboxStatus = "running"
    exit_code: int | None = None
    started_at: datetime = Field(default_factory=_now)
    ended_at: datetime | None = None
    link: str | None = None

    @field_validator("resources", "calls", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("attempt", "exit_code", mode="before")
    @classmethod
    def _ints(cls, value: Any) -> Any:
        return None if value in ("", "None") else value

    @property
    def key(self) -> str:
        if self.calls is not None:
            return warm_artifact_key(self.sandbox_id)
        if self.task_run_id is not None:
            return task_artifact_key(self.task_run_id)
        if self.flow_run_id is not None:
            return flow_artifact_key(self.flow_run_id)
        raise ValueError("a sandbox artifact belongs to a task run or a flow run")

    @property
    def seconds(self) -> float | None:
        """How long the sandbox ran (None while it runs)."""
        return (self.ended_at - self.started_at).total_seconds() if self.ended_at else None

    def estimated_cost(self, now: datetime | None = None) -> float | None:
        """Estimated dollars at Modal's list prices (see `pricing`); to `now` while running."""
        from prefect_modal.core.pricing import estimate_cost

        return estimate_cost(self.resources, self.started_at, self.ended_at, now=now)

    @property
    def warm(self) -> bool:
        return self.calls is not None

    def call_views(self) -> list[SandboxArtifact]:
        """One record per task run this sandbox served (itself, for a one-call sandbox):
        the sandbox's fields with the task run's, its call number and the call's times."""
        if self.calls is None:
            return [self]
        return [
            self.model_copy(
                update={
                    "task_run_id": c.task_run_id,
                    "task_name": c.task_name,
                    "attempt": c.attempt,
                    "call_in_sandbox": c.call,
                    "status": c.status,
                    "exit_code": None,
                    "started_at": c.started_at,
                    "ended_at": c.ended_at,
                    "calls": None,
                }
            )
            for c in self.calls
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One row per field, nested values as JSON text so every cell renders."""
        data = self.model_dump(mode="json")
        data["estimated_cost_usd"] = _rounded(self.estimated_cost())
        return [
            {"field": name, "value": json.dumps(value) if isinstance(value, dict | list) else value}
            for name, value in data.items()
        ]

    def description(self) -> str:
        """The artifact's description: the line the UI shows above the table."""
        return (
            f"Modal sandbox `{self.sandbox_id}` ({self.status}"
            + (f", exit code {self.exit_code}" if self.exit_code is not None else "")
            + f") in app `{self.app_name}` on {self.target}."
            + (
                f" Warm: it served {len(self.calls)} task run(s) of its flow run, one at a time."
                if self.calls is not None
                else ""
            )
            + (f" See: `{self.link}`" if self.link else "")
            + _lingering_hint(self)
        )

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> SandboxArtifact:
        return cls.model_validate({row["field"]: row["value"] for row in rows})

    def summary_row(self) -> dict[str, Any]:
        """The row of the flow-level table: what a person scans for."""
        res = self.resources
        return {
            "task": self.task_name or "(flow run)",
            "attempt": self.attempt,
            "sandbox_id": self.sandbox_id,
            "calls_in_sandbox": len(self.calls) if self.calls is not None else 1,
            "status": self.status,
            "exit_code": self.exit_code,
            "gpu": res.get("gpu"),
            "cpu": res.get("cpu"),
            "memory_mib": res.get("memory_mib"),
            "image": res.get("image"),
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "seconds": round(self.seconds, 1) if self.seconds is not None else None,
            "estimated_cost_usd": _rounded(self.estimated_cost()),
            "link": self.link,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def total_row(records: list[SandboxArtifact]) -> dict[str, Any]:
    """The table's last row: the run's estimated cost in total (sandboxes that ran to an end)."""
    costs = [r.estimated_cost() for r in records]
    known = [c for c in costs if c is not None]
    sandboxes = len({r.sandbox_id for r in records})
    served = sum(len(r.calls) if r.calls is not None else 1 for r in records)
    calls = f", {served} calls" if served != sandboxes else ""
    return {
        "task": "(total, estimate)",
        "sandbox_id": f"{sandboxes} sandbox{'es' if sandboxes != 1 else ''}{calls}",
        "estimated_cost_usd": _rounded(sum(known)) if known else None,
    }


def cost_note(records: list[SandboxArtifact]) -> str:
    """Says what the cost column is: an estimate, at which rates, and what it leaves out."""
    from prefect_modal.core.pricing import current_rates, format_cost

    rates = current_rates()
    known = [c for r in records if (c := r.estimated_cost()) is not None]
    unknown = len(records) - len(known)
    return (
        f"Estimated cost {format_cost(sum(known))} at {rates.label} "
        f"(requested CPU, memory and GPUs x seconds; source: {rates.source.split(' ')[0]})"
        + (
            f"; {unknown} sandbox(es) without an estimate (still running or unknown GPU)"
            if unknown
            else ""
        )
        + ". An estimate, not a bill."
    )


def _short(run_id: UUID | str) -> str:
    """The whole id as 32 hex digits.

    Run ids are UUIDv7: their first 48 bits are a millisecond timestamp, so any
    prefix short enough to read is shared by every run created in the same
    minute, and Prefect treats artifacts with one key as versions of one
    artifact (the UI shows only the latest).  Only the whole id is unique.
    """
    return UUID(str(run_id)).hex


def task_artifact_key(task_run_id: UUID | str) -> str:
    """Prefect keys are `^[a-z0-9-]*$`: our prefix and the task run id's hex."""
    return f"{KEY_PREFIX}{_short(task_run_id)}"


def warm_artifact_key(sandbox_id: str) -> str:
    """A warm sandbox's key: sandbox ids are case-sensitive, so a digest of the id."""
    return f"{KEY_PREFIX}warm-{hashlib.sha256(sandbox_id.encode()).hexdigest()[:32]}"


def flow_artifact_key(flow_run_id: UUID | str) -> str:
    return f"{KEY_PREFIX}flow-{_short(flow_run_id)}"


def summary_artifact_key(flow_run_id: UUID | str) -> str:
    return f"modal-sandboxes-{_short(flow_run_id)}"


def _lingering_hint(record: SandboxArtifact) -> str:
    if record.mode != "pipeline" or record.status != "running":
        return ""
    return (
        " It ends with its flow run: the worker terminates it if it still runs "
        f"{FINAL_GRACE_SECONDS:.0f} s after the run is final."
    )


def write_sandbox_artifact(
    record: SandboxArtifact, client: SyncPrefectClient | None = None
) -> UUID:
    """Write (a new version of) the record's artifact on its task or flow run; its id.

    Called at sandbox start and again at its end, so the UI shows a running
    sandbox's id while it runs, and the final status and exit code afterwards.
    Pass an open ``client`` when writing many: opening one costs ten times the
    write itself (see `task_runner.artifact_writer.ArtifactWriter`).
    """
    artifact = ArtifactCreate(
        key=record.key,
        type=ARTIFACT_TYPE,
        description=record.description(),
        data=json.dumps(record.rows()),
        flow_run_id=record.flow_run_id,
        task_run_id=record.task_run_id,
    )
    if client is not None:
        return client.create_artifact(artifact).id
    with get_client(sync_client=True) as fresh:
        return fresh.create_artifact(artifact).id


def update_sandbox_artifact(artifact_id: UUID, record: SandboxArtifact) -> None:
    """Rewrite an artifact in place (no new version): a record that changes often, a
    session's, stays one artifact, so the run's graph shows it once."""
    with get_client(sync_client=True) as client:
        client.update_artifact(
            artifact_id,
            ArtifactUpdate(data=json.dumps(record.rows()), description=record.description()),
        )


def write_flow_summary(flow_run_id: UUID, records: list[SandboxArtifact]) -> None:
    """The flow-level table: every sandbox the run used, one row each."""
    if not records:
        return
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=summary_artifact_key(flow_run_id),
                type=ARTIFACT_TYPE,
                description=(
                    f"Modal sandboxes of flow run {flow_run_id} ({len(records)}). "
                    + cost_note(records)
                ),
                data=json.dumps([*(r.summary_row() for r in records), total_row(records)]),
                flow_run_id=flow_run_id,
            )
        )


def read_sandbox_artifacts(flow_run_id: UUID | str) -> list[SandboxArtifact]:
    """The latest record of every sandbox of a flow run: its own, its tasks' and its
    sessions' (one per artifact key; a warm sandbox's lists the task runs it served)."""
    body = {
        "artifacts": ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))]),
            key=ArtifactFilterKey(like_=KEY_PREFIX),
            type=ArtifactFilterType(any_=[ARTIFACT_TYPE]),
        ).model_dump(mode="json", exclude_unset=True),
        "sort": ArtifactSort.CREATED_DESC.value,
        "limit": _PAGE,
    }
    artifacts: list[Artifact] = []
    with get_client(sync_client=True) as client:
        while True:  # the API pages at 200; a 200-task map writes twice that
            # Posted directly: Prefect 3.8's client sends `null` for filters it
            # was not given (rejected), and empty task-run filters drop every
            # artifact that has no task run (a pipeline sandbox's).
            response = client.request(
                "POST", "/artifacts/filter", json={**body, "offset": len(artifacts)}
            )
            page = Artifact.model_validate_list(response.json())
            artifacts.extend(page)
            if len(page) < _PAGE:
                break
    latest: dict[str, SandboxArtifact] = {}
    for artifact in artifacts:
        if not artifact.key or not artifact.key.startswith(KEY_PREFIX):
            continue
        rows: Any = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        try:
            record = SandboxArtifact.from_rows(rows)
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours after all; never fail a status call on it
        latest.setdefault(record.sandbox_id, record)
    return sorted(latest.values(), key=lambda r: r.started_at)
