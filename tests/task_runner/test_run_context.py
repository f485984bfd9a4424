"""What a task sees inside its sandbox: run logger, prefect.runtime, tags, run context,
nested calls, the image's packages; and the runner's thread setting and artifact keys."""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from typing import Any

import prefect.runtime
import pytest
from prefect import flow, get_run_logger, tags, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
from prefect.context import TagsContext, get_run_context
from prefect.settings import PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS, temporary_settings
from runner_support import sandboxes_of, wait_until

from prefect_modal import ModalTaskRunner, SandboxSpec, modal_options
from prefect_modal.core.artifacts import read_sandbox_artifacts, task_artifact_key
from prefect_modal.core.packages import Requirements
from prefect_modal.task_runner import call as sandbox_call

#: How long the logging task goes on after its records (see the live-logs test).
LINGER_SECONDS = 6

PREFECT_PIN = f"prefect=={__import__('importlib.metadata').metadata.version('prefect')}"


def _logs_of(task_run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
        )


def _flow_run_id() -> str:
    return str(get_run_context().flow_run.id)


# -- the run logger ---------------------------------------------------------------


def test_run_logger_records_arrive_live_on_the_task_run(make_runner):
    """Records reach the task run while the task still runs, at their level, with extra
    fields.  (Live: a record's time is when the flow process received it, seconds
    before the task ended; a sandbox has its own filesystem, so no file can signal.)"""
    token = uuid.uuid4().hex

    @task(log_prints=True)
    def chatty(token: str) -> bool:
        import time

        logger = get_run_logger()
        logger.info("info %s", token, extra={"color": "blue"})
        logger.warning("warning %s", token)
        logger.debug("debug %s", token)
        print(f"printed {token}")
        time.sleep(LINGER_SECONDS)
        return True

    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if token in record.getMessage():
                seen.append(record)

    handler = Collect()
    logging.getLogger("prefect.task_runs").addHandler(handler)

    @flow(task_runner=make_runner())
    def f():
        fut = chatty.submit(token)
        return fut.result(), fut.task_run_id

    try:
        result, task_run_id = f()
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert result is True

    def arrived() -> list[Any] | None:
        logs = [log for log in _logs_of(task_run_id) if token in log.message]
        return logs if len(logs) >= 3 else None

    logs = wait_until(arrived, timeout=60, what="the sandbox's records on the task run")
    ended = _task_run(task_run_id).end_time
    assert ended is not None
    for log in logs:  # received while the task was still sleeping, not at its end
        assert (ended - log.timestamp).total_seconds() > LINGER_SECONDS / 2, log.message
    levels = {log.message: log.level for log in logs}
    assert levels[f"info {token}"] == logging.INFO
    assert levels[f"warning {token}"] == logging.WARNING
    assert levels[f"printed {token}"] == logging.INFO
    assert f"debug {token}" not in levels  # below the run logger's level, as in Prefect
    assert all(log.name == "prefect.task_runs" for log in logs)
    (info,) = [r for r in seen if r.getMessage() == f"info {token}"]
    assert info.color == "blue"  # type: ignore[attr-defined]
    assert str(info.task_run_id) == str(task_run_id)  # type: ignore[attr-defined]


# -- runtime, tags, run context ---------------------------------------------------------


@task(tags=["own-tag"])
def what_it_sees(x: int) -> dict[str, Any]:
    rt = prefect.runtime
    ctx = get_run_context()
    return {
        "task_run.id": rt.task_run.id,
        "task_run.name": rt.task_run.name,
        "task_run.task_name": rt.task_run.task_name,
        "task_run.tags": sorted(rt.task_run.tags),
        "task_run.parameters": rt.task_run.parameters,
        "task_run.run_count": rt.task_run.run_count,
        "flow_run.id": rt.flow_run.id,
        "flow_run.name": rt.flow_run.name,
        "flow_run.flow_name": rt.flow_run.flow_name,
        "flow_run.parameters": rt.flow_run.parameters,
        "flow_run.scheduled_start_time": rt.flow_run.scheduled_start_time,
        "flow_run.run_count": rt.flow_run.run_count,
        "flow_run.root_flow_run_id": rt.flow_run.root_flow_run_id,
        "flow_run.parent_flow_run_id": rt.flow_run.parent_flow_run_id,
        "deployment.id": rt.deployment.id,
        "deployment.name": rt.deployment.name,
        "tags_context": sorted(TagsContext.get().current_tags),
        "context": (type(ctx).__name__, str(ctx.task_run.id), ctx.task_run.name, ctx.parameters),
        "prefect_imported": "prefect" in sys.modules,
    }


@task
def no_prefect_here(x: int) -> dict[str, Any]:
    return {"x": x, "prefect_imported": "prefect" in sys.modules}


def test_runtime_tags_and_context_are_what_thread_pool_gives(make_runner, modal_server):
    local = modal_options(local=True)(what_it_sees)

    @flow(task_runner=make_runner())
    def f(n: int = 3):
        with tags("outer-tag"):
            remote = what_it_sees.submit(n)
            here = local.submit(n)
        plain = no_prefect_here.submit(n)
        return remote.result(), here.result(), plain.result(), remote.task_run_id, _flow_run_id()

    remote, here, plain, task_run_id, flow_run_id = f()
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(task_run_id)
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
        flow_name = client.read_flow(flow_run.flow_id).name
    # equal to the API's records
    assert remote["task_run.id"] == str(task_run.id)
    assert remote["task_run.name"] == task_run.name
    assert remote["task_run.task_name"] == "what_it_sees"
    assert set(remote["task_run.tags"]) == set(task_run.tags) == {"own-tag", "outer-tag"}
    assert remote["tags_context"] == sorted(task_run.tags)
    assert remote["task_run.parameters"] == {"x": 3}
    assert remote["task_run.run_count"] == 1
    assert remote["flow_run.id"] == flow_run_id
    assert remote["flow_run.name"] == flow_run.name
    assert remote["flow_run.flow_name"] == flow_name
    assert remote["flow_run.parameters"] == {"n": 3}
    assert remote["flow_run.scheduled_start_time"] == flow_run.expected_start_time
    assert remote["flow_run.root_flow_run_id"] == flow_run_id
    assert remote["context"] == ("TaskRunContext", str(task_run.id), task_run.name, {"x": 3})
    assert remote["prefect_imported"] is True
    # what the same task sees in the flow's process (ThreadPoolTaskRunner's way)
    for key in (
        "task_run.task_name",
        "task_run.parameters",
        "task_run.run_count",
        "flow_run.id",
        "flow_run.name",
        "flow_run.flow_name",
        "flow_run.parameters",
        "flow_run.scheduled_start_time",
        "flow_run.run_count",
        "flow_run.root_flow_run_id",
        "flow_run.parent_flow_run_id",
        "deployment.id",
        "deployment.name",
        "prefect_imported",
    ):
        assert remote[key] == here[key], key
    assert set(remote["task_run.tags"]) == set(here["task_run.tags"])
    # a task that does not use Prefect never imports it remotely, and gets no extra package
    assert plain == {"x": 3, "prefect_imported": False}
    records = {r.task_name: r for r in read_sandbox_artifacts(flow_run_id)}
    assert PREFECT_PIN in records["what_it_sees"].resources["pip_packages"]
    assert not records["no_prefect_here"].resources.get("pip_packages")
    assert len(sandboxes_of(modal_server, flow_run_id)) == 2  # the local one ran here


def test_the_api_is_refused_with_the_reason(make_runner):
    @task
    def reads_api() -> str:
        ctx = get_run_context()
        try:
            ctx.client.read_flow_run(ctx.task_run.flow_run_id)
        except Exception as exc:
            return str(exc)
        return "no error"

    @flow(task_runner=make_runner())
    def f():
        return reads_api.submit().result()

    message = f()
    assert "Prefect API is not available inside a Modal sandbox" in message
    assert "no Prefect API key and no route to the API" in message


# -- nested calls -------------------------------------------------------------------


@task
def child(x: int) -> int:
    return x * 10


@task
def failing_child(x: int) -> int:
    raise ValueError(f"child failed on {x}")


@task
def submits_child(x: int) -> int:
    return child.submit(x).result()


@task
def parent_of_many(x: int) -> dict[str, Any]:
    first = child.submit(x)
    second = child.submit(first)  # a future passed on: lineage, as in the flow
    mapped = child.map([1, 2])
    direct = child(x + 1)  # a nested call: a child task run, its result returned
    try:
        failing_child(x)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    return {
        "second": second.result(),
        "mapped": mapped.result(),
        "direct": direct,
        "raised": raised,
        "ids": [str(first.task_run_id), str(second.task_run_id)],
    }


def _task_run(task_run_id: Any) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_task_run(uuid.UUID(str(task_run_id)))


@pytest.mark.parametrize("reuse", [True, False], ids=["warm", "per-call"])
def test_nested_submits_and_calls_are_proxied_to_the_flow(make_runner, modal_server, reuse):
    @flow(task_runner=make_runner(reuse_sandboxes=reuse))
    def f():
        fut = parent_of_many.submit(2)
        return fut.result(), fut.task_run_id, _flow_run_id()

    result, parent_id, flow_run_id = f()
    assert result["second"] == 200 and result["mapped"] == [10, 20] and result["direct"] == 30
    assert result["raised"] == "child failed on 2"
    records = sandboxes_of(modal_server, flow_run_id)
    if reuse:
        # warm: the replies to the parent's nested submits are framed on stdin, so they
        # never mix with a later call; children share the warm sandboxes left free
        assert records and all(r.tags.get("prefect-modal.warm") == "1" for r in records)
        assert all(r.returncode == 0 for r in records)
    else:
        by_task = {}
        for record in records:
            by_task.setdefault(record.tags["prefect.task-name"], []).append(record)
        # every child ran in a sandbox of its own, as a task run of the same flow run
        assert len(by_task["child"]) == 5 and len(by_task["failing_child"]) == 1
        assert len(by_task["parent_of_many"]) == 1
    first_id, second_id = result["ids"]

    def recorded() -> Any:
        second = _task_run(second_id)
        return second if second.task_inputs.get("__parents__") else None

    second = wait_until(recorded, timeout=30, what="the nested child task run with its parent")
    parents = {str(i.id) for i in second.task_inputs["__parents__"]}
    # Prefect also counts an input whose task run is still running as a parent
    assert str(parent_id) in parents and parents <= {str(parent_id), first_id}
    assert {str(i.id) for i in second.task_inputs["x"]} == {first_id}  # upstream lineage
    assert str(second.flow_run_id) == flow_run_id


def test_a_refused_nested_submit_says_why(make_runner):
    @task
    def submits_unpicklable() -> str:

        try:
            child.submit(threading.Lock())  # cannot travel to the flow process
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    @flow(task_runner=make_runner())
    def f():
        return submits_unpicklable.submit().result()

    message = f()
    assert "Unable to determine task runner" not in message
    assert message.startswith("TypeError: prefect-modal could not send task 'child'")
    assert "must be picklable" in message and "lock" in message


def test_a_local_parent_submits_children_to_their_own_sandboxes(make_runner, modal_server):
    parent = modal_options(local=True)(submits_child)

    # the child's sandbox is found by its task run tag: a per-call sandbox
    @flow(task_runner=make_runner(reuse_sandboxes=False))
    def f():
        fut = parent.submit(4)
        return fut.result(), fut.task_run_id, _flow_run_id()

    value, parent_id, flow_run_id = f()
    assert value == 40
    (record,) = sandboxes_of(modal_server, flow_run_id)  # the child's; the parent ran here

    def child_run() -> Any:
        with get_client(sync_client=True) as client:
            run = client.read_task_run(uuid.UUID(record.tags["prefect.task-run-id"]))
        return run if run.task_inputs.get("__parents__") else None

    run = wait_until(child_run, timeout=30, what="the child task run with its parent")
    assert {str(i.id) for i in run.task_inputs["__parents__"]} == {str(parent_id)}


# -- the image --------------------------------------------------------------------


@task
def logs_something() -> int:
    get_run_logger().info("using Prefect in the sandbox")
    return 1


#: the user's own requirement for prefect: another spelling of this flow's version
#: (a pickled Prefect call needs the same Prefect on both sides)
USER_PREFECT = f"prefect>={PREFECT_PIN.split('==')[1]},<={PREFECT_PIN.split('==')[1]}"


def test_packages_added_to_the_default_image_are_logged(make_runner):
    off = modal_options(auto_packages=False)(logs_something)
    pinned = modal_options(pip_packages=[USER_PREFECT])(logs_something)

    @flow(task_runner=make_runner())
    def f():
        futures = [logs_something.submit(), off.submit(), pinned.submit()]
        for fu in futures:
            fu.wait()
        states = [fu.state for fu in futures]  # in a list: a failed state would fail the flow
        return states, [fu.task_run_id for fu in futures], _flow_run_id()

    (auto, no_auto, user), (auto_id, off_id, pinned_id), flow_run_id = f()
    assert auto.result() == 1 and user.result() == 1
    # without auto_packages the image has no Prefect, as on Modal: the bootstrap says so
    error = no_auto.result(raise_on_failure=False)
    assert isinstance(error, sandbox_call.SandboxImageError), error
    assert "lacks prefect" in str(error) and PREFECT_PIN in str(error)
    records = {
        v.task_run_id: v for r in read_sandbox_artifacts(flow_run_id) for v in r.call_views()
    }
    assert records[auto_id].resources["pip_packages"] == [PREFECT_PIN]
    assert not records[off_id].resources.get("pip_packages")
    assert records[pinned_id].resources["pip_packages"] == [USER_PREFECT]  # the user's wins

    def added_line(task_run_id: Any) -> list[str]:
        return [
            log.message
            for log in _logs_of(task_run_id)
            if log.message.startswith("Adding to the default image")
        ]

    line = wait_until(lambda: added_line(auto_id), timeout=30, what="the packages log line")
    assert PREFECT_PIN in line[0] and "auto_packages=False" in line[0]
    assert wait_until(lambda: _logs_of(off_id), timeout=30, what="logs of the second task")
    assert not added_line(off_id) and not added_line(pinned_id)


def test_an_image_without_a_needed_package_fails_naming_it(make_runner, monkeypatch):
    """The bootstrap checks the modules a call needs before loading it.  (On this machine
    every sandbox sees the flow's packages, so the call is made to need one nobody has.)"""
    real = sandbox_call.packages.requirements

    def needing_more(modules: Any, user_module: Any = None) -> Requirements:
        found = real(modules, user_module)
        return Requirements(modules=(*found.modules, "no_such_module_xyz"), pins=found.pins)

    monkeypatch.setattr(sandbox_call.packages, "requirements", needing_more)

    @modal_options(image="python:3.11-slim")
    @task
    def in_registry_image() -> int:
        return 1

    @flow(task_runner=make_runner())
    def f():
        fut = in_registry_image.submit()
        fut.wait()
        return [fut.state]

    (state,) = f()
    assert state.is_failed()
    assert "python:3.11-slim lacks no_such_module_xyz" in state.message
    assert "pip_packages" in state.message and "Nothing of the call ran" in state.message


# -- the runner ---------------------------------------------------------------------


def test_thread_pool_max_workers_setting_is_honoured(credentials):
    assert ModalTaskRunner(credentials=credentials, max_parallelism=8)._max_workers == 256
    with temporary_settings({PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS: 3}):
        runner = ModalTaskRunner(credentials=credentials, max_parallelism=8)
        explicit = ModalTaskRunner(credentials=credentials, max_workers=5)
        with runner.duplicate() as started:
            assert started._executor is not None and started._executor._max_workers == 3
    assert runner._max_workers == 3 and runner.max_parallelism == 8
    assert explicit._max_workers == 5
    with pytest.raises(ValueError, match="max_workers=0"):
        ModalTaskRunner(credentials=credentials, max_workers=0)


def test_artifact_keys_are_unique_per_task_run_without_reuse(make_runner):
    """A sandbox per call: its artifact is the task run's (warm: one per sandbox, see
    test_warm_sandboxes)."""

    @task
    def step(i: int) -> int:
        return i

    @flow(task_runner=make_runner(spec=SandboxSpec(cpu=0.25), reuse_sandboxes=False))
    def f():
        futures = step.map(range(6))
        return [fu.task_run_id for fu in futures], [fu.result() for fu in futures], _flow_run_id()

    runs = [f(), f()]
    task_run_ids = [tid for ids, _, _ in runs for tid in ids]
    expected = {task_artifact_key(tid) for tid in task_run_ids}
    assert len(expected) == 12
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {
                    "flow_run_id": {"any_": [run_id for _, _, run_id in runs]},
                    "key": {"like_": "modal-sandbox-"},
                },
                "limit": 200,
            },
        )
    keys = {a["key"] for a in response.json() if a["task_run_id"]}
    assert keys == expected
