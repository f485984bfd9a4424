"""Per-step sandboxes emit `prefect-modal.sandbox.*` events, read back through the API."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timezone

from events_api import related_ids, wait_for_events
from prefect import flow, task
from prefect.runtime import flow_run

from prefect_modal import SandboxSpec


@task
def fine() -> int:
    return 1


@task
def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


def test_per_step_sandboxes_emit_lifecycle_events(make_runner) -> None:
    """A sandbox per call: its events relate to the call's task run."""
    since = datetime.now(timezone.utc)

    @flow(
        task_runner=make_runner(spec=SandboxSpec(cpu=0.5, memory="256MiB"), reuse_sandboxes=False)
    )
    def evented() -> tuple[str, str, str]:
        ok = fine.submit()
        bad = killed.submit()
        bad.wait()
        ok.wait()
        return flow_run.get_id(), str(ok.task_run_id), str(bad.task_run_id)

    run_id, ok_task, bad_task = evented()

    def mine(events: list[dict]) -> list[dict]:
        return [e for e in events if f"prefect.flow-run.{run_id}" in related_ids(e, "flow-run")]

    events = wait_for_events(
        since, lambda evs: sum(e["event"].endswith(".exited") for e in mine(evs)) >= 2
    )
    events = mine(events)
    by_task: dict[str, list[dict]] = {}
    for event in events:
        (task_run,) = related_ids(event, "task-run")
        by_task.setdefault(task_run.removeprefix("prefect.task-run."), []).append(event)
    assert set(by_task) == {ok_task, bad_task}
    for evs in by_task.values():
        names = [e["event"].removeprefix("prefect-modal.sandbox.") for e in evs]
        assert names[:2] == ["created", "running"] and names[-1] == "exited", names
        resource = evs[-1]["resource"]
        sandbox_id = resource["modal.sandbox.id"]
        assert resource["prefect.resource.id"] == f"modal.sandbox.{sandbox_id}"
        assert resource["modal.sandbox.app"] == "prefect-modal"
        assert resource["modal.sandbox.cpu"] == "0.5" and resource["modal.sandbox.memory"] == "256"
        assert (
            resource["modal.sandbox.gpu"] == "none"
            and "debian_slim" in resource["modal.sandbox.image"]
        )
        # Prefect's events worker adds the flow from the run context
        assert related_ids(evs[-1], "flow"), evs[-1]["related"]
        assert all(e["resource"]["prefect.resource.id"] == resource["prefect.resource.id"]
                   for e in evs)  # fmt: skip
    ok_exit = by_task[ok_task][-1]
    assert ok_exit["resource"]["modal.sandbox.exit-code"] == "0"
    assert ok_exit["payload"]["reason"] == "succeeded" and ok_exit["payload"]["exit_code"] == 0
    assert ok_exit["payload"]["estimated_cost_usd"] > 0
    bad_exit = by_task[bad_task][-1]
    assert bad_exit["resource"]["modal.sandbox.exit-code"] == "137"
    assert bad_exit["resource"]["modal.sandbox.reason"] == "terminated"
    assert bad_exit["payload"]["exit_code"] == 137


def test_a_warm_sandbox_is_created_and_exits_once_and_runs_each_call(make_runner) -> None:
    since = datetime.now(timezone.utc)

    @flow(task_runner=make_runner(max_parallelism=1))
    def three() -> tuple[str, list[str]]:
        futures = [fine.submit() for _ in range(3)]
        for fut in futures:
            fut.wait()
        return flow_run.get_id(), [str(fut.task_run_id) for fut in futures]

    run_id, task_runs = three()

    def mine(events: list[dict]) -> list[dict]:
        return [e for e in events if f"prefect.flow-run.{run_id}" in related_ids(e, "flow-run")]

    events = mine(
        wait_for_events(since, lambda evs: any(e["event"].endswith(".exited") for e in mine(evs)))
    )
    names = [e["event"].removeprefix("prefect-modal.sandbox.") for e in events]
    assert names == ["created", "running", "running", "running", "exited"], names
    assert len({e["resource"]["prefect.resource.id"] for e in events}) == 1  # one sandbox
    running = [e for e in events if e["event"].endswith(".running")]
    assert sorted(
        task_run.removeprefix("prefect.task-run.")
        for e in running
        for task_run in related_ids(e, "task-run")
    ) == sorted(task_runs)
    created, exited = events[0], events[-1]
    assert not related_ids(created, "task-run") and not related_ids(exited, "task-run")
    assert exited["payload"]["reason"] == "succeeded" and exited["payload"]["exit_code"] == 0
    assert exited["payload"]["estimated_cost_usd"] > 0
