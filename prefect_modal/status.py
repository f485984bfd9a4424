"""Which sandboxes a flow run has, how they are doing, and ending the ones left running.

Two sources, because each can miss what the other knows: the artifacts the
runner (or worker) wrote on the run, which survive the sandbox and hold its
resources and final status; and Modal's own list of running sandboxes tagged
with the flow run id, which also finds a sandbox whose start record never
reached Prefect (the process died in between).  The CLI, the worker and the
`terminate_sandboxes` hook all use these functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect_modal.core import artifacts, tags
from prefect_modal.core.artifacts import SandboxArtifact, read_sandbox_artifacts
from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.spec import DEFAULT_APP_NAME

#: Tag every prefect-modal sandbox carries (see `CallInfo.tags` and the worker).
FLOW_RUN_TAG = tags.FLOW_RUN

_EXIT_STATUS = {0: "succeeded", 137: "terminated", 124: "timeout"}

#: A pipeline sandbox's grace after its run is final (defined with the records
#: that explain it, in `artifacts.py`).
FINAL_GRACE_SECONDS = artifacts.FINAL_GRACE_SECONDS

_FINAL_RECORD = ("succeeded", "failed", "terminated", "timeout", "crashed")


@dataclass(frozen=True)
class SandboxReport:
    """One sandbox of a flow run: what the record says and what Modal says now."""

    sandbox_id: str
    live_status: str  # "running", "succeeded", "failed", "terminated", "timeout", "gone"
    returncode: int | None
    record: SandboxArtifact | None
    #: The task runs it served, in call order: one record each (`call_views()`).
    calls: tuple[SandboxArtifact, ...] = ()

    @property
    def running(self) -> bool:
        return self.live_status == "running"

    def display_status(self, run_state: Any = None) -> str:
        """The live status, or "lingering" for a running sandbox of a final run."""
        if self.running and run_state is not None and run_state.is_final():
            return "lingering"
        return self.live_status

    def row(self) -> dict[str, Any]:
        rec = self.record
        return {
            "sandbox_id": self.sandbox_id,
            "task": rec.task_name if rec else None,
            "attempt": rec.attempt if rec else None,
            "status": self.live_status,
            "exit_code": self.returncode,
            "recorded_status": rec.status if rec else None,
            "gpu": rec.resources.get("gpu") if rec else None,
            "link": rec.link if rec else None,
            "task_runs": [str(c.task_run_id) for c in self.calls if c.task_run_id],
        }


def _live(sandbox_id: str, client: Any) -> tuple[str, int | None]:
    from prefect_modal.core import modal_api

    try:
        code = modal_api.returncode_by_id(sandbox_id, client)
    except modal_api.NotFoundError:
        return "gone", None
    if code is None:
        return "running", None
    return _EXIT_STATUS.get(code, "failed"), code


def _running_by_tag(flow_run_id: UUID, client: Any, app_names: Iterable[str]) -> list[str]:
    """Running sandboxes tagged with the run, looked for app by app (Modal
    deprecates listing a whole environment)."""
    from prefect_modal.core import modal_api

    found: list[str] = []
    for app_name in dict.fromkeys(app_names):
        for sb in modal_api.list_in_app(app_name, {FLOW_RUN_TAG: str(flow_run_id)}, client):
            if modal_api.sandbox_id(sb) not in found:
                found.append(modal_api.sandbox_id(sb))
    return found


def flow_run_sandboxes(
    flow_run_id: UUID | str,
    credentials: ModalCredentials | None = None,
    client: Any = None,
) -> list[SandboxReport]:
    """Every sandbox of a flow run (its tasks' and its own), with its live status.

    `client` (a modal.Client) overrides the target chosen from `credentials`.
    """
    run_id = UUID(str(flow_run_id))
    if client is None:
        from prefect_modal.core.targets import resolve_target

        client = resolve_target(credentials).client
    records = {r.sandbox_id: r for r in read_sandbox_artifacts(run_id)}
    ids = list(records)
    apps = [DEFAULT_APP_NAME, *(r.app_name for r in records.values())]
    ids += [sid for sid in _running_by_tag(run_id, client, apps) if sid not in records]
    reports = []
    for sid in ids:
        status, code = _live(sid, client)
        reports.append(
            SandboxReport(
                sandbox_id=sid,
                live_status=status,
                returncode=code,
                record=records.get(sid),
                calls=tuple(records[sid].call_views()) if sid in records else (),
            )
        )
    return reports


def terminate_sandboxes(
    flow: Any = None,
    flow_run: Any = None,
    state: Any = None,
    *,
    flow_run_id: UUID | str | None = None,
    credentials: ModalCredentials | None = None,
    client: Any = None,
) -> list[str]:
    """Terminate every sandbox a flow run left running; returns their ids.

    Has the signature of a flow state hook, so it can be given as is::

        @flow(task_runner=ModalTaskRunner(), on_cancellation=[terminate_sandboxes],
              on_crashed=[terminate_sandboxes])

    or called with `flow_run_id=` from a script, the CLI or the worker.
    """
    run_id = flow_run_id or (flow_run.id if flow_run is not None else None)
    if run_id is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            raise ValueError("terminate_sandboxes needs a flow run: pass flow_run_id=")
        run_id = ctx.flow_run.id
    from prefect_modal.core import modal_api

    if client is None and credentials is None and flow is not None:
        client = _client_of_flow(flow)
    running = [r.sandbox_id for r in flow_run_sandboxes(run_id, credentials, client) if r.running]
    if client is None:
        from prefect_modal.core.targets import resolve_target

        client = resolve_target(credentials).client
    return [sid for sid in running if modal_api.terminate_by_id(sid, client)]


def _client_of_flow(flow: Any) -> Any:
    """The client of the flow's ModalTaskRunner, so the hook reaches the same Modal."""
    runner = getattr(flow, "task_runner", None)
    target = getattr(runner, "target", None)
    if callable(target):
        try:
            return target().client
        except Exception:
            return None
    return None


def summarize(reports: Iterable[SandboxReport]) -> dict[str, int]:
    """Counts by live status, e.g. {'running': 2, 'succeeded': 10}."""
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.live_status] = counts.get(r.live_status, 0) + 1
    return counts


def run_state(flow_run_id: UUID | str) -> Any:
    """The flow run's current state, or None when the API cannot say."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(str(flow_run_id))).state
    except Exception:
        return None


def lingering_note(reports: Iterable[SandboxReport], state: Any) -> str | None:
    """What a person should know when a final run's sandbox still runs."""
    lingering = [r.sandbox_id for r in reports if r.running]
    if not lingering or state is None or not state.is_final():
        return None
    return (
        f"The flow run is {state.name}, but {', '.join(lingering)} still runs: a sandbox ends "
        f"with its run; Prefect's engine reports the final state just before its process "
        f"exits, and the worker terminates a sandbox still running {FINAL_GRACE_SECONDS:.0f} s "
        "after its run became final. `prefect-modal cancel` ends it now."
    )


def wait_for_final_records(
    flow_run_id: UUID | str, timeout: float = FINAL_GRACE_SECONDS + 15, interval: float = 0.5
) -> list[SandboxArtifact]:
    """The run's sandbox records once none says running (or whatever they say at `timeout`).

    For tables printed right after a run ends: the worker writes a sandbox's
    final record when its process has exited, a moment after the run's state.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_sandbox_artifacts(flow_run_id)
        if all(r.status in _FINAL_RECORD for r in records) or time.monotonic() >= deadline:
            return records
        time.sleep(interval)
