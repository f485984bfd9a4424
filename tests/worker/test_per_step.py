"""per_step mode through the worker: one sandbox for the flow run, one per task call."""

from __future__ import annotations

import json
from typing import Any

import pytest
from worker_helpers import (
    MAIN_POOL,
    ModalServer,
    deploy,
    flow_run_logs,
    start_run,
    wait_final,
    wait_for,
)

from prefect_modal.core import tags

pytestmark = pytest.mark.slow


def _task_sandbox(found: dict[str, str]) -> bool:
    """A task's sandbox: per call (tagged with its task run) or warm (shared)."""
    return tags.TASK_RUN in found or tags.WARM in found


def test_per_step_one_sandbox_for_flow_plus_one_per_task(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    dep = deploy(
        api,
        MAIN_POOL,
        "flows.py:fan_out",
        "fan-out",
        job_variables={
            "mode": "per_step",
            "max_parallelism": 2,
            "cpu": 0.25,
            "env": {"TASK_SETTING": "on"},
        },
    )
    run_id = start_run(api, dep, n=2)
    run = wait_final(api, run_id, timeout=120)
    assert run.state.is_completed(), run.state

    [flow_sandbox] = modal_server.for_run(run_id)
    assert flow_sandbox.tags[tags.MODE] == "per_step"
    tasks = [
        r
        for r in modal_server.sandboxes()
        if r.tags.get(tags.FLOW_RUN) == str(run_id) and _task_sandbox(r.tags)
    ]
    # warm sandboxes (the default, as in ModalTaskRunner): the two calls, submitted at
    # once with max_parallelism 2, start up to two sandboxes and share them
    assert 1 <= len(tasks) <= 2, [r.tags for r in modal_server.sandboxes()]
    assert all(t.tags.get(tags.WARM) == "1" for t in tasks)
    assert all(t.id != flow_sandbox.id and t.cpu == 0.25 for t in tasks)
    # The job's own env reaches the tasks; Prefect's API settings do not need to.
    assert all("TASK_SETTING" in t.env_names for t in tasks)
    # The tasks' prints come back as the task runs' logs.
    wait_for(
        lambda: all(
            any(f"TASK-PRINT double {i}" in m for m in flow_run_logs(api, run_id)) for i in (0, 1)
        ),
        30,
        "the tasks' prints in the run's logs",
    )


def test_per_step_lays_the_flows_own_runner_spec_over_the_pools(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    """The pool gives the defaults (memory, POOL_VAR), the flow's ModalTaskRunner the
    specifics (cpu, FLOW_VAR, and SHARED where both set it); the artifact shows the layers."""
    dep = deploy(
        api,
        MAIN_POOL,
        "layered.py:layered",
        "layered",
        job_variables={
            "mode": "per_step",
            "cpu": 0.25,
            "memory": 300,
            "env": {"POOL_VAR": "from-pool", "SHARED": "from-pool"},
        },
    )
    run_id = start_run(api, dep)
    run = wait_final(api, run_id, timeout=120)
    assert run.state.is_completed(), run.state
    [task_box] = [
        r
        for r in modal_server.sandboxes()
        if r.tags.get(tags.FLOW_RUN) == str(run_id) and _task_sandbox(r.tags)
    ]
    assert task_box.cpu == 0.5  # the flow's
    assert task_box.memory_mib == 300  # the pool's
    assert {"POOL_VAR", "FLOW_VAR", "SHARED"} <= set(task_box.env_names)
    wait_for(
        lambda: any(
            "LAYERED-ENV POOL_VAR=from-pool FLOW_VAR=from-flow SHARED=from-flow" in m
            for m in flow_run_logs(api, run_id)
        ),
        30,
        "the task's view of the layered env in the run's logs",
    )
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    [artifact] = api.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"modal-task-spec-{run_id.hex[:8]}"])
        )
    )
    assert artifact.flow_run_id == run_id
    rows = {row["field"]: row for row in json.loads(artifact.data)}
    assert rows["cpu"]["work pool (defaults)"] == 0.25
    assert rows["cpu"]["flow's ModalTaskRunner (specifics)"] == 0.5
    assert rows["cpu"]["tasks get"] == 0.5
    assert rows["memory"]["tasks get"] == 300
    assert rows["env"]["tasks get"] == "FLOW_VAR, POOL_VAR, SHARED"  # names only, never values
    assert "from-pool" not in artifact.data and "from-flow" not in artifact.data
