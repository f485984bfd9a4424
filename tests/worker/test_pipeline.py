"""Pipeline mode end to end: real Prefect server, real worker process, local Modal server."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
from worker_helpers import (
    MAIN_POOL,
    PREFECT,
    ModalServer,
    PrefectServer,
    deploy,
    flow_run_logs,
    start_run,
    wait_final,
    wait_for,
)

from prefect_modal.core import tags
from prefect_modal.core.artifacts import read_sandbox_artifacts

pytestmark = pytest.mark.slow

POOL = MAIN_POOL


def test_deploy_and_run_completes_with_artifact_and_sandbox_logs(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    dep = deploy(api, POOL, "flows.py:hello", "hello", job_variables={"cpu": 0.5})
    run_id = start_run(api, dep, who="modal")
    run = wait_final(api, run_id)
    assert run.state.is_completed(), run.state

    # One sandbox, named after the run, tagged, with the deployment's cpu over the
    # pool's and the pool's memory (deployment job variables override the pool's).
    [record] = modal_server.for_run(run_id)
    assert record.name == f"prefect-{run_id}"
    assert record.tags[tags.DEPLOYMENT] == str(dep)
    assert record.tags[tags.WORK_POOL] == str(api.read_work_pool(POOL).id)
    assert record.cpu == 0.5 and record.memory_mib == 1024
    assert run.infrastructure_pid == record.id

    # The artifact on the flow run: sandbox id, app, resources, image, link.
    [artifact] = wait_for(
        lambda: [a for a in read_sandbox_artifacts(run_id) if a.status != "running"],
        20,
        "the final sandbox artifact",
    )
    assert artifact.sandbox_id == record.id and artifact.mode == "pipeline"
    assert artifact.status == "succeeded" and artifact.exit_code == 0
    assert artifact.app_name == "prefect-modal" and artifact.target == "local"
    assert artifact.resources["cpu"] == 0.5 and "image" in artifact.resources
    assert artifact.link and record.id in artifact.link

    # The sandbox's own output (a print, not a log record) is in the flow run's logs.
    logs = wait_for(
        lambda: [m for m in flow_run_logs(api, run_id) if "SANDBOX-PRINT" in m],
        20,
        "the sandbox's print in the flow run logs",
    )
    assert any(record.id in m for m in logs)
    messages = flow_run_logs(api, run_id)
    # The engine's own records are not duplicated by the forwarding.
    assert sum("LOGGER-LINE hello modal" in m for m in messages) == 1
    assert "SANDBOX-PRINT hello modal" in main_worker.log()


def test_flow_that_raises_is_failed(api: Any, main_worker: Any, modal_server: ModalServer) -> None:
    dep = deploy(api, POOL, "flows.py:boom", "boom")
    run_id = start_run(api, dep)
    run = wait_final(api, run_id)
    assert run.state.is_failed(), run.state
    assert "BOOM-MARKER" in (run.state.message or "") or any(
        "BOOM-MARKER" in m for m in flow_run_logs(api, run_id)
    )
    [record] = wait_for(
        lambda: [r for r in modal_server.for_run(run_id) if r.status != "running"], 20, "exit"
    )
    assert record.status == "exited"


def test_sandbox_killed_from_outside_is_crashed_with_exit_code(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    from prefect_modal.core import modal_api

    dep = deploy(api, POOL, "flows.py:sleepy", "sleepy")
    run_id = start_run(api, dep, seconds=120)
    # Wait for the flow's own first line, so the crash message has user output to show
    # (Running is set by the engine before the flow body starts).
    wait_for(
        lambda: any("SLEEPY-START" in m for m in flow_run_logs(api, run_id)),
        60,
        "the flow to print SLEEPY-START",
    )
    [record] = modal_server.for_run(run_id)
    # Like `modal sandbox terminate`: from outside the worker.
    assert modal_api.terminate_by_id(record.id, modal_server.client)
    run = wait_final(api, run_id, timeout=30)
    assert run.state.is_crashed(), run.state
    assert "137" in run.state.message
    assert "SLEEPY-START" in run.state.message  # the last output lines


def test_cancel_running_flow_terminates_sandbox_within_10s(
    api: Any,
    main_worker: Any,
    modal_server: ModalServer,
    prefect_server: PrefectServer,
    tmp_path: Any,
) -> None:
    dep = deploy(api, POOL, "flows.py:sleepy", "sleepy-cancel")
    run_id = start_run(api, dep, seconds=120)
    wait_for(lambda: api.read_flow_run(run_id).state.is_running(), 60, "the run to start")
    [record] = modal_server.for_run(run_id)
    assert record.status == "running"
    subprocess.run(
        [PREFECT, "flow-run", "cancel", str(run_id)],
        env=prefect_server.env(tmp_path),
        check=True,
        capture_output=True,
        timeout=60,
    )
    cancelled_at = time.monotonic()
    wait_for(lambda: modal_server.for_run(run_id)[0].status != "running", 10, "the sandbox to stop")
    assert time.monotonic() - cancelled_at < 10
    run = wait_final(api, run_id, timeout=10)
    assert run.state.is_cancelled(), run.state
    assert modal_server.for_run(run_id)[0].status == "terminated"


def test_a_flow_run_whose_sandbox_times_out_is_crashed_naming_the_limit(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    """Modal's wait() raises SandboxTimeoutError for it (modal/sandbox/_common.py); the
    worker reports it as the run's crash, with the `timeout` job variable's value."""
    dep = deploy(api, POOL, "flows.py:sleepy", "sleepy-timeout", job_variables={"timeout": 20})
    run_id = start_run(api, dep, seconds=300)
    run = wait_final(api, run_id, timeout=120)
    assert run.state.is_crashed(), run.state
    assert "timed out after 20 s" in (run.state.message or ""), run.state.message
    [artifact] = wait_for(
        lambda: [a for a in read_sandbox_artifacts(run_id) if a.status != "running"],
        20,
        "the final sandbox artifact",
    )
    assert artifact.status == "timeout" and artifact.exit_code == 124
