"""A worker killed mid-run and restarted: no second sandbox, every run ends recorded."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.states import Cancelled
from worker_helpers import (
    ModalServer,
    create_pool,
    deploy,
    flow_run_logs,
    start_run,
    wait_final,
    wait_for,
)

from prefect_modal.core import modal_api
from prefect_modal.core.artifacts import read_sandbox_artifacts

pytestmark = pytest.mark.slow

POOL = "modal-restart"


def test_worker_restart_adopts_crashes_and_cleans_up(
    api: Any, worker_factory: Any, modal_server: ModalServer, tmp_path: Any
) -> None:
    create_pool(api, POOL)
    worker = worker_factory(POOL, name="restart-worker", home=tmp_path)
    dep = deploy(api, POOL, "flows.py:sleepy", "sleepy-restart")
    survivor = start_run(api, dep, seconds=20)  # keeps running while the worker is down
    victim = start_run(api, dep, seconds=120)  # its sandbox dies while the worker is down
    orphan = start_run(api, dep, seconds=120)  # cancelled while the worker is down
    for run_id in (survivor, victim, orphan):
        wait_for(lambda r=run_id: api.read_flow_run(r).state.is_running(), 60, f"{run_id} to run")
    # Running is set before the flow's body runs: the victim's crash message must carry its
    # last output, so it is killed only once it has printed (a race CI met on 2 cores)
    wait_for(
        lambda: any("SLEEPY-START" in m for m in flow_run_logs(api, victim)),
        60,
        "the victim to print SLEEPY-START",
    )

    worker.kill()  # SIGKILL: no cleanup, no goodbye
    [survivor_box] = modal_server.for_run(survivor)
    [victim_box] = modal_server.for_run(victim)
    [orphan_box] = modal_server.for_run(orphan)
    assert survivor_box.status == "running"  # sandboxes outlive their worker, as on Modal
    assert modal_api.terminate_by_id(victim_box.id, modal_server.client)
    api.set_flow_run_state(orphan, Cancelled(message="cancelled while no worker ran"), force=True)

    worker.start()  # same name, same home: it finds its sandboxes by their tags

    # The survivor finishes in its one sandbox, and the restarted worker records it.
    run = wait_final(api, survivor, timeout=60)
    assert run.state.is_completed(), run.state
    assert [r.id for r in modal_server.for_run(survivor)] == [survivor_box.id]
    final = wait_for(
        lambda: [a for a in read_sandbox_artifacts(survivor) if a.status == "succeeded"],
        30,
        "the adopted run's final artifact",
    )
    assert final[0].sandbox_id == survivor_box.id and final[0].exit_code == 0
    assert "adopted running sandbox" in worker.log()

    # The run whose sandbox died without reporting is Crashed with the exit code.
    run = wait_final(api, victim, timeout=30)
    assert run.state.is_crashed(), run.state
    assert "137" in run.state.message and victim_box.id in run.state.message
    assert "SLEEPY-START" in run.state.message

    # The Cancelled run's sandbox is terminated; nobody started a second one anywhere.
    wait_for(lambda: modal_server.for_run(orphan)[0].status == "terminated", 30, "orphan ended")
    assert [r.id for r in modal_server.for_run(orphan)] == [orphan_box.id]
    for run_id in (survivor, victim, orphan):
        assert len(modal_server.for_run(run_id)) == 1
