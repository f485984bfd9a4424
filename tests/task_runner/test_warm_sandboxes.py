"""Warm sandboxes (issue 13): per-step calls with equal settings share sandboxes
within a flow run, one call at a time; `reuse_sandboxes=False` keeps one per call."""

from __future__ import annotations

import time

import pytest
from prefect import flow, task
from prefect.context import get_run_context
from runner_support import sandboxes_of, wait_until

from prefect_modal import modal_options


@task
def double(x: int) -> int:
    return 2 * x


@task
def bump_module_state() -> int:
    """A module that stays imported in a warm sandbox keeps its attributes."""
    import sys
    import types

    state = sys.modules.setdefault("pm_warm_state", types.ModuleType("pm_warm_state"))
    state.count = getattr(state, "count", 0) + 1  # type: ignore[attr-defined]
    return state.count  # type: ignore[attr-defined]


def _flow_run_id() -> object:
    return get_run_context().flow_run.id  # type: ignore[union-attr]


def test_sixty_calls_at_parallelism_four_share_at_most_eight_sandboxes(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=4))
    def sixty() -> tuple[object, list[int]]:
        return _flow_run_id(), double.map(range(60)).result()

    run_id, results = sixty()
    assert results == [2 * i for i in range(60)]
    used = sandboxes_of(modal_server, run_id)
    assert 1 <= len(used) <= 8, len(used)
    assert all(s.status != "running" for s in used), [s.status for s in used]


def test_without_reuse_every_call_gets_its_own_sandbox(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=4, reuse_sandboxes=False))
    def six() -> tuple[object, list[int]]:
        return _flow_run_id(), double.map(range(6)).result()

    run_id, results = six()
    assert results == [0, 2, 4, 6, 8, 10]
    assert len(sandboxes_of(modal_server, run_id)) == 6


def test_module_state_persists_only_in_warm_mode(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=1))
    def warm() -> list[int]:
        return [bump_module_state.submit().result() for _ in range(3)]

    @flow(task_runner=make_runner(max_parallelism=1, reuse_sandboxes=False))
    def cold() -> list[int]:
        return [bump_module_state.submit().result() for _ in range(3)]

    isolated = modal_options(reuse=False)(bump_module_state)

    @flow(task_runner=make_runner(max_parallelism=1))
    def opted_out() -> list[int]:
        return [isolated.submit().result() for _ in range(3)]

    assert warm() == [1, 2, 3]
    assert cold() == [1, 1, 1]
    assert opted_out() == [1, 1, 1]


@task(timeout_seconds=1)
def slow_then_fast(sleep: float) -> str:
    import os

    time.sleep(sleep)
    return os.environ.get("MODAL_SANDBOX_ID", "")


def test_a_timed_out_calls_sandbox_is_replaced(make_runner, modal_server):
    @flow(task_runner=make_runner(max_parallelism=1))
    def f() -> tuple[object, object, str]:
        first = slow_then_fast.submit(0)
        first_id = first.result()
        timed_out = slow_then_fast.submit(30)
        timed_out.wait()
        return _flow_run_id(), (first_id, timed_out.state), slow_then_fast.submit(0).result()

    started = time.monotonic()
    run_id, (first_id, state), third_id = f()
    assert time.monotonic() - started < 30
    assert state.is_failed() and state.name == "TimedOut"
    assert first_id and third_id and first_id != third_id
    records = {r.id: r for r in sandboxes_of(modal_server, run_id)}
    assert len(records) == 2
    assert records[first_id].status == "terminated" and records[first_id].returncode == 137


@task
def where(_: int) -> str:
    import os

    return os.environ.get("MODAL_SANDBOX_ID", "")


def test_different_specs_never_share_a_sandbox(make_runner, modal_server):
    small = modal_options(cpu=0.25)(where)
    other_env = modal_options(env={"PM_WARM": "1"})(where)

    @flow(task_runner=make_runner(max_parallelism=3))
    def f() -> tuple[list[str], ...]:
        plain, a, b = where.map(range(6)), small.map(range(6)), other_env.map(range(6))
        return plain.result(), a.result(), b.result()

    groups = [set(g) for g in f()]
    assert all(groups), groups
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2])
    assert not (groups[1] & groups[2])


@task
def fails_once(path_key: str) -> str:
    """Raises on its first call in a sandbox, then succeeds: the sandbox stays warm."""
    import os
    import sys
    import types

    state = sys.modules.setdefault("pm_fail_state", types.ModuleType("pm_fail_state"))
    if not getattr(state, path_key, False):
        setattr(state, path_key, True)
        raise RuntimeError("first attempt fails")
    return os.environ.get("MODAL_SANDBOX_ID", "")


def test_a_call_that_raises_leaves_its_sandbox_warm_for_the_retry(make_runner, modal_server):
    retried = fails_once.with_options(retries=1, retry_delay_seconds=0)

    @flow(task_runner=make_runner(max_parallelism=1))
    def f() -> tuple[object, str]:
        return _flow_run_id(), retried.submit("k").result()

    run_id, served_by = f()
    (record,) = sandboxes_of(modal_server, run_id)
    assert record.id == served_by


@task
def chatty(name: str, lines: int) -> None:
    for i in range(lines):
        print(f"{name} line {i}", flush=True)
        time.sleep(0.02)


def test_logs_of_interleaved_tasks_land_on_their_own_task_runs(make_runner, modal_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    @flow(task_runner=make_runner(max_parallelism=1))
    def f() -> list[object]:
        futures = [chatty.submit(name, 15) for name in ("alpha", "beta", "alpha2", "beta2")]
        for fut in futures:
            fut.wait()
        return [fut.task_run_id for fut in futures]

    ids = f()
    names = ("alpha", "beta", "alpha2", "beta2")

    def logs(task_run_id: object) -> list[str]:
        with get_client(sync_client=True) as client:
            return [
                log.message
                for log in client.read_logs(
                    log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
                )
            ]

    sandbox_lines = []
    for name, task_run_id in zip(names, ids, strict=True):
        messages = wait_until(
            lambda t=task_run_id: (m := logs(t)) and sum(" line " in x for x in m) >= 15 and m,
            timeout=30,
        )
        printed = [m for m in messages if " line " in m]
        assert printed == [f"{name} line {i}" for i in range(15)], printed
        sandbox_lines += [m for m in messages if "call " in m and "in this sandbox" in m]
    # one sandbox served all four, and each task run's log says which call it was
    assert sorted(line.split("call ")[1].split(" ")[0] for line in sandbox_lines) == [
        "1",
        "2",
        "3",
        "4",
    ], sandbox_lines


def test_cancel_with_warm_sandboxes_busy_and_idle_leaves_none(prefect_api, modal_server, tmp_path):
    from deployment_runs import execute_in_a_process, failure_report, run_of_entrypoint
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling
    from test_runner_lifecycle import HERE, REPO, _flow_process_env

    run = run_of_entrypoint(
        "cancel-warm",
        f"cancel-warm-{tmp_path.name}",
        f"{HERE / 'cancel_flow.py'}:cancel_warm",
        REPO,
    )
    proc = execute_in_a_process(run, _flow_process_env(prefect_api, modal_server, tmp_path), REPO)
    try:

        def running() -> list[object]:
            return [r for r in sandboxes_of(modal_server, run.id) if r.status == "running"]

        def sleepers_running() -> int:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            with get_client(sync_client=True) as client:
                runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                )
            return sum(
                1
                for r in runs
                if r.flow_run_id == run.id
                and r.name.startswith("sleepy")
                and r.state
                and r.state.is_running()
            )

        wait_until(lambda: len(running()) == 8, timeout=90)
        wait_until(lambda: sleepers_running() == 4, timeout=60)
        time.sleep(1.0)  # the sleepers' calls reach their sandboxes
        requested = time.monotonic()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        wait_until(lambda: not running(), timeout=30, interval=0.05)
        gone_after = time.monotonic() - requested
        proc.wait(60)
    except AssertionError as exc:  # what the flow process said, and its sandboxes
        report = failure_report(proc, sandboxes_of(modal_server, run.id))
        raise AssertionError(f"{exc}\n{report}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0] if proc.stdout and not proc.stdout.closed else ""
    records = sandboxes_of(modal_server, run.id)
    assert len(records) == 8, output[-3000:]
    assert {r.status for r in records} == {"terminated"}, output[-3000:]
    assert gone_after < 5, f"sandboxes still running {gone_after:.1f} s after the cancel request"


def test_records_and_status_show_which_task_runs_a_sandbox_served(
    make_runner, credentials, modal_server
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect_modal.core.artifacts import (
        read_sandbox_artifacts,
        summary_artifact_key,
        warm_artifact_key,
    )
    from prefect_modal.status import flow_run_sandboxes

    @flow(task_runner=make_runner(max_parallelism=1))
    def f() -> tuple[object, list[object]]:
        futures = [double.submit(i) for i in range(3)]
        for fut in futures:
            fut.wait()
        return _flow_run_id(), [fut.task_run_id for fut in futures]

    run_ids, task_run_ids = [], []
    for _ in range(2):
        run_id, ids = f()
        run_ids.append(run_id)
        task_run_ids.append(ids)
    # one artifact per warm sandbox, on the flow run, listing its three calls in order
    (record,) = read_sandbox_artifacts(run_ids[0])
    (listed,) = sandboxes_of(modal_server, run_ids[0])
    assert record.sandbox_id == listed.id and record.key == warm_artifact_key(listed.id)
    assert record.status == "succeeded" and record.exit_code == 0 and record.ended_at
    assert record.task_run_id is None and record.flow_run_id == run_ids[0]
    assert record.calls is not None and [c.call for c in record.calls] == [1, 2, 3]
    assert sorted(str(c.task_run_id) for c in record.calls) == sorted(
        str(t) for t in task_run_ids[0]
    )
    assert {c.status for c in record.calls} == {"succeeded"}
    assert all(c.ended_at and c.ended_at >= c.started_at for c in record.calls)
    # task run -> sandbox: one record per call
    views = record.call_views()
    assert [v.call_in_sandbox for v in views] == [1, 2, 3]
    assert {v.sandbox_id for v in views} == {listed.id}
    # the second run's sandbox has a key of its own
    (other,) = read_sandbox_artifacts(run_ids[1])
    assert other.key != record.key and other.sandbox_id != record.sandbox_id

    (report,) = flow_run_sandboxes(run_ids[0], credentials=credentials)
    assert report.row()["task_runs"] == [str(c.task_run_id) for c in record.calls]
    assert report.live_status == "succeeded" and report.returncode == 0
    # the flow's table: one row per sandbox, counting its calls
    with get_client(sync_client=True) as client:
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[summary_artifact_key(run_ids[0])])
            )
        )
    rows = (
        summary.data
        if isinstance(summary.data, list)
        else __import__("json").loads(str(summary.data))
    )
    assert rows[0]["sandbox_id"] == listed.id and rows[0]["calls_in_sandbox"] == 3
    assert rows[-1]["sandbox_id"] == "1 sandbox, 3 calls"


def test_a_warm_sandbox_that_dies_before_its_bootstrap_fails_the_call_with_its_output(
    make_runner, modal_server, monkeypatch
):
    """A warm sandbox is up when its bootstrap greets, not when create returns: one that
    exits first (an image that cannot run it) fails the waiting call as a sandbox of
    its own would, with its exit code and last lines, and is not started again."""
    from prefect_modal.task_runner import call as sandbox_call

    def no_bootstrap() -> list[str]:
        script = "import sys; print('no bootstrap in this image', file=sys.stderr); sys.exit(5)"
        return ["python", "-c", script]

    monkeypatch.setattr(sandbox_call, "bootstrap_command", no_bootstrap)

    @flow(task_runner=make_runner(max_parallelism=2))
    def f() -> tuple[object, object]:
        return _flow_run_id(), double.submit(1).result(raise_on_failure=False)

    run_id, error = f()
    assert isinstance(error, sandbox_call.SandboxCrashedError), error
    assert "exit code 5" in str(error) and "before its bootstrap started" in str(error)
    assert "no bootstrap in this image" in str(error)
    (only,) = sandboxes_of(modal_server, run_id)
    assert only.status != "running"


def test_bad_reuse_settings_fail_when_written(credentials):
    from prefect_modal import ModalTaskRunner

    with pytest.raises(ValueError, match=r"reuse_sandboxes='yes' must be True or False"):
        ModalTaskRunner(credentials=credentials, reuse_sandboxes="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"idle_seconds=0 must be a number of seconds above 0"):
        ModalTaskRunner(credentials=credentials, idle_seconds=0)
    with pytest.raises(TypeError, match=r"modal_options\(reuse='no'\): reuse must be True"):
        modal_options(reuse="no")  # type: ignore[arg-type]


def test_latency_model_fits_the_published_figures_and_delays_starts(tmp_path):
    import modal

    from prefect_modal.local import LocalModal
    from prefect_modal.local.latency import LatencyModel, resolve

    model = resolve("modal")
    assert model is not None
    assert abs(model.quantile(0.5) - 2.66) < 0.01
    assert abs(model.quantile(0.95) - 11.78) / 11.78 < 0.05
    assert abs(model.quantile(0.99) - 22.39) / 22.39 < 0.05
    assert resolve("off") is None and resolve(None) is None
    with pytest.raises(ValueError, match=r"latency='fast' is not a latency model"):
        LocalModal(latency="fast")

    fixed = LatencyModel(start_median_s=0.6, start_sigma=0.0, rpc_round_trip_s=0.0)
    with LocalModal(state_dir=tmp_path / "lm", latency=fixed) as lm:
        client = lm.client
        app = modal.App.lookup("latency", create_if_missing=True, client=client)
        started = time.monotonic()
        sb = modal.Sandbox.create("cat", app=app, client=client)
        created = time.monotonic() - started
        # as on Modal: create returns once scheduled, the command starts after the delay;
        # what was written meanwhile reaches it, and a terminate needs no start
        sb.stdin.write(b"hello")
        sb.stdin.write_eof()
        sb.stdin.drain()
        assert sb.stdout.read() == "hello"
        first_output = time.monotonic() - started
        sb.wait(raise_on_termination=False)
        assert sb.returncode == 0
        pending = modal.Sandbox.create("sleep", "60", app=app, client=client)
        pending.terminate()
        pending.wait(raise_on_termination=False)
        assert pending.returncode == 137
    assert created < 0.6 <= first_output, (created, first_output)


def test_a_sandbox_given_back_after_its_pool_closed_is_terminated_not_ended(
    credentials, modal_server, monkeypatch
):
    """A call that leased a sandbox and was cancelled before it used it gives it back
    after `cancel_all` closed the pool.  `close` terminates it; closing its stdin as
    well (the graceful end of an idle sandbox) would let the bootstrap exit 0 first,
    and a cancelled run's sandbox would be recorded as exited."""
    import threading

    from prefect_modal.core import modal_api
    from prefect_modal.core.spec import SandboxSpec
    from prefect_modal.task_runner.call import bootstrap_command
    from prefect_modal.task_runner.warm import StartPlan, WarmPool, pool_key

    closed_stdin: list[str] = []
    send_stdin = modal_api.send_stdin

    def spy(sandbox: object, data: bytes, eof: bool = False) -> None:
        if eof:
            closed_stdin.append(modal_api.sandbox_id(sandbox))
        send_stdin(sandbox, data, eof=eof)

    monkeypatch.setattr(modal_api, "send_stdin", spy)
    spec = SandboxSpec(timeout=120)
    tags = {"prefect-modal.test": "given-back"}

    def starter() -> StartPlan:
        name = f"pf-test-given-back-{time.monotonic_ns()}"
        client = credentials.get_client()
        return StartPlan(spec, bootstrap_command(), client, name, tags, lambda warm: None)

    pool = WarmPool(threading.BoundedSemaphore(2), idle_seconds=60)
    warm = pool.lease(pool_key(spec), 120, starter)
    assert warm is not None and warm.ready.is_set()
    closing = pool.close()  # cancel_all: the termination goes out in a thread
    pool.give_back(warm, keep=True)  # leased, never used: the call was cancelled
    for thread in closing:
        thread.join(10)
    assert warm.dead.wait(10), f"{warm.sandbox_id} still running after the pool closed"
    (record,) = [r for r in modal_server.sandboxes() if r.id == warm.sandbox_id]
    assert (record.status, record.returncode) == ("terminated", 137)
    assert warm.sandbox_id not in closed_stdin
