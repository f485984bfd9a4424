"""Pipeline sandboxes: lifecycle events with the run's related resources, and a
sandbox that ends with its run (within the documented grace) and is shown final."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from events_api import related_ids, wait_for_events
from worker_helpers import MAIN_POOL, ModalServer, deploy, start_run, wait_final

from prefect_modal.core.artifacts import read_sandbox_artifacts, summary_artifact_key
from prefect_modal.status import FINAL_GRACE_SECONDS, wait_for_final_records

pytestmark = pytest.mark.slow


def test_pipeline_sandbox_events_carry_run_flow_deployment_and_pool(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    since = datetime.now(timezone.utc)
    dep = deploy(api, MAIN_POOL, "flows.py:hello", "hello-events")
    run_id = start_run(api, dep, who="events")
    run = wait_final(api, run_id, timeout=120)
    assert run.state.is_completed(), run.state

    def mine(events: list[dict]) -> list[dict]:
        return [e for e in events if f"prefect.flow-run.{run_id}" in related_ids(e, "flow-run")]

    events = mine(
        wait_for_events(since, lambda evs: any(e["event"].endswith(".exited") for e in mine(evs)))
    )
    names = [e["event"] for e in events]
    assert names == [
        "prefect-modal.sandbox.created",
        "prefect-modal.sandbox.running",
        "prefect-modal.sandbox.exited",
    ], names
    [sandbox] = modal_server.for_run(run_id)
    exited = events[-1]
    assert exited["resource"]["prefect.resource.id"] == f"modal.sandbox.{sandbox.id}"
    assert exited["resource"]["modal.sandbox.cpu"] == "2.0"  # the pool's
    assert exited["resource"]["modal.sandbox.memory"] == "1024"
    assert exited["resource"]["modal.sandbox.mode"] == "pipeline"
    assert exited["resource"]["modal.sandbox.exit-code"] == "0"
    assert exited["payload"]["reason"] == "succeeded"
    assert related_ids(exited, "flow") == [f"prefect.flow.{run.flow_id}"]
    assert related_ids(exited, "deployment") == [f"prefect.deployment.{dep}"]
    pool = api.read_work_pool(MAIN_POOL)
    assert related_ids(exited, "work-pool") == [f"prefect.work-pool.{pool.id}"]

    # The run's sandbox table: cost per sandbox and in total, called an estimate.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    [table] = api.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_artifact_key(run_id)]))
    )
    rows = json.loads(table.data)
    assert rows[0]["sandbox_id"] == sandbox.id and rows[0]["estimated_cost_usd"] > 0
    assert rows[-1]["task"] == "(total, estimate)"
    assert rows[-1]["estimated_cost_usd"] == rows[0]["estimated_cost_usd"]
    assert "Estimated cost" in (table.description or "")
    assert "not a bill" in (table.description or "")


def test_a_lingering_pipeline_sandbox_ends_within_the_grace_after_its_run(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    """The flow returns but its process does not exit: the worker ends the sandbox
    once the run has been final for FINAL_GRACE_SECONDS, and the record says so."""
    since = datetime.now(timezone.utc)
    dep = deploy(api, MAIN_POOL, "flows.py:lingering", "lingering")
    run_id = start_run(api, dep)
    run = wait_final(api, run_id, timeout=120)
    final_at = time.monotonic()
    assert run.state.is_completed(), run.state
    [running] = read_sandbox_artifacts(run_id)
    records = wait_for_final_records(run_id, timeout=FINAL_GRACE_SECONDS + 20)
    ended_after = time.monotonic() - final_at
    [record] = records
    assert record.status == "terminated", (record.status, running.status)
    # the worker's watcher looks every 2 s; the record is written right after
    assert ended_after <= FINAL_GRACE_SECONDS + 10, ended_after
    [sandbox] = modal_server.for_run(run_id)
    assert sandbox.status != "running"
    events = wait_for_events(
        since,
        lambda evs: any(
            e["event"].endswith(".exited")
            and f"prefect.flow-run.{run_id}" in related_ids(e, "flow-run")
            for e in evs
        ),
    )
    mine = [e for e in events if f"prefect.flow-run.{run_id}" in related_ids(e, "flow-run")]
    assert [e["event"].rsplit(".", 1)[1] for e in mine][-2:] == ["terminated", "exited"]
    assert mine[-1]["payload"]["reason"] == "terminated"
    print(f"lingering sandbox final {ended_after:.1f} s after its run")  # for the report
