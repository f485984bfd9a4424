"""ModalTaskRunner: the TaskRunner contract, cancellation, logs, artifacts, secrets, status."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from deployment_runs import execute_in_a_process, failure_report, run_of_entrypoint
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
from prefect.context import get_run_context
from prefect.futures import as_completed, wait
from prefect.states import Cancelling
from runner_support import sandboxes_of, wait_until

from prefect_modal import ModalTaskRunner, SandboxSpec, modal_options
from prefect_modal.core.artifacts import (
    read_sandbox_artifacts,
    summary_artifact_key,
    task_artifact_key,
)
from prefect_modal.local import LocalModal
from prefect_modal.status import flow_run_sandboxes, terminate_sandboxes

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@task
def double(x: int) -> int:
    return 2 * x


def flow_run_id() -> str:
    return str(get_run_context().flow_run.id)


def _flow_process_env(prefect_api: str, modal_server: LocalModal, tmp_path: Path) -> dict[str, str]:
    """The environment of a flow run in a process of its own: the session's Prefect API
    and local server, and a home of its own (never the machine's ~/.modal.toml)."""
    return {
        **os.environ,
        **modal_server.env,
        "PREFECT_API_URL": prefect_api,
        "HOME": str(tmp_path),
        "MODAL_CONFIG_PATH": str(tmp_path / ".modal.toml"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


# -- the TaskRunner contract ----------------------------------------------------------


def test_duplicate_equality_and_pickling(credentials):
    runner = ModalTaskRunner(SandboxSpec(cpu=2), max_parallelism=4, credentials=credentials)
    dup = runner.duplicate()
    assert dup == runner and dup is not runner and dup._family == runner._family
    assert runner != ModalTaskRunner(SandboxSpec(cpu=4), max_parallelism=4, credentials=credentials)
    assert runner != ModalTaskRunner(SandboxSpec(cpu=2), max_parallelism=5, credentials=credentials)
    with runner.duplicate() as started:
        clone = cloudpickle.loads(cloudpickle.dumps(started))
    assert clone == runner and clone._family == runner._family and not clone._started
    assert clone.spec.cpu == 2.0


def test_submit_and_map_outside_a_flow(make_runner):
    with make_runner() as runner:
        one = runner.submit(double, parameters={"x": 4}, wait_for=[])
        many = runner.map(double, parameters={"x": [1, 2, 3]})
        wait([one, *many])
        assert one.result() == 8
        assert sorted(f.result() for f in as_completed(many)) == [2, 4, 6]
        assert many.result() == [2, 4, 6]


def test_nested_futures_as_arguments(make_runner):
    @task
    def total(values: dict) -> int:
        return sum(values["items"]) + values["extra"]

    @flow(task_runner=make_runner())
    def f():
        a, b = double.submit(1), double.submit(2)
        return total.submit({"items": [a, b], "extra": double.submit(10)}).result()

    assert f() == 2 + 4 + 20


# -- cancellation ------------------------------------------------------------------------


def test_flow_cancellation_terminates_all_in_flight_sandboxes(prefect_api, modal_server, tmp_path):
    run = run_of_entrypoint(
        "cancel-me", f"cancel-test-{tmp_path.name}", f"{HERE / 'cancel_flow.py'}:cancel_me", REPO
    )
    env = _flow_process_env(prefect_api, modal_server, tmp_path)
    proc = execute_in_a_process(run, env, REPO)
    try:

        def running():
            return [r for r in sandboxes_of(modal_server, run.id) if r.status == "running"]

        assert len(wait_until(lambda: len(running()) == 8 and running(), timeout=90)) == 8
        requested = time.monotonic()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        wait_until(lambda: not running(), timeout=30, interval=0.05)
        gone_after = time.monotonic() - requested
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0][-5000:]
            raise AssertionError("flow process did not exit:\n" + output) from None
        with get_client(sync_client=True) as client:
            final = wait_until(
                lambda: (s := client.read_flow_run(run.id).state) and s.is_final() and s, timeout=30
            )
    except AssertionError as exc:  # what the flow process said, and its sandboxes
        report = failure_report(proc, sandboxes_of(modal_server, run.id))
        raise AssertionError(f"{exc}\n{report}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0] if proc.stdout and not proc.stdout.closed else ""
    records = sandboxes_of(modal_server, run.id)
    assert len(records) == 8 and {r.status for r in records} == {"terminated"}, output[-3000:]
    assert gone_after < 5, f"sandboxes still running {gone_after:.1f} s after the cancel request"
    assert final.is_cancelled(), (final, output[-3000:])


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _history(record, since: float) -> str:
    """One sandbox's life relative to `since`, for a failure report."""
    ended = f"{record.finished_at - since:+.2f}s" if record.finished_at else "-"
    return (
        f"  {record.id} {record.name} {record.status} rc={record.returncode} "
        f"created {record.created_at - since:+.2f}s ended {ended} tags={record.tags}"
    )


def _stacks_of(pid: int) -> str:
    """The flow process's thread stacks (py-spy, when installed), for a failure report."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return "(py-spy not installed: no stacks)"
    done = subprocess.run(
        [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
    )
    return f"py-spy dump of the flow process:\n{done.stdout}{done.stderr}"


def test_ctrl_c_of_the_flow_process_leaves_no_sandbox(prefect_api, modal_server, tmp_path):
    env = _flow_process_env(prefect_api, modal_server, tmp_path)
    before = {r.id for r in modal_server.sandboxes()}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "cancel_flow.py"), "sleepers"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C in a terminal reaches a process whose SIGINT is at its default. A
        # test run started in the background by a shell without job control (as CI
        # may be) has SIGINT ignored, and a child would inherit that and never see it.
        preexec_fn=_sigint_as_in_a_terminal,
    )

    def mine():
        return [
            r
            for r in modal_server.sandboxes()
            if r.id not in before and r.tags.get("prefect.task-name", "").startswith("sleepy")
        ]

    gone_after: float | None = None
    interrupted_at = time.time()
    stacks = ""
    try:
        wait_until(lambda: len([r for r in mine() if r.status == "running"]) == 4, timeout=90)
        proc.send_signal(signal.SIGINT)
        interrupted, interrupted_at = time.monotonic(), time.time()
        with contextlib.suppress(AssertionError):  # what was left is reported below
            wait_until(lambda: all(r.status != "running" for r in mine()), timeout=30)
            gone_after = time.monotonic() - interrupted
        if gone_after is None or gone_after >= 5:
            stacks = _stacks_of(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    finally:
        if proc.poll() is None:
            stacks = stacks or _stacks_of(proc.pid)
            proc.kill()
        output = proc.communicate()[0]
    left = [(r.id, r.status, r.pid) for r in mine()]
    history = "\n".join(_history(r, interrupted_at) for r in modal_server.sandboxes())
    report = (
        f"sandboxes: {left}\ngone after: {gone_after}\nevery sandbox, times from the SIGINT:\n"
        f"{history}\nflow process (exit {proc.returncode}):\n{output[-6000:]}\n{stacks}"
    )
    assert {status for _, status, _ in left} == {"terminated"}, report
    assert gone_after is not None and gone_after < 5, report
    assert proc.returncode != 0, report


def test_cancel_all_on_the_template_reaches_the_duplicates_calls(make_runner, modal_server):
    import threading

    template = make_runner()

    @task
    def sleepy(i: int) -> int:
        time.sleep(60)
        return i

    run_ids: list[str] = []

    @flow(task_runner=template)
    def f():
        run_ids.append(flow_run_id())
        futures = sleepy.map(range(3))
        futures.wait()
        return [fut.state for fut in futures]

    def cancel_when_running() -> None:
        wait_until(
            lambda: (
                run_ids
                and len(
                    [r for r in sandboxes_of(modal_server, run_ids[0]) if r.status == "running"]
                )
                == 3
            ),
            timeout=30,
        )
        template.cancel_all()  # what Prefect's flow engine calls on cancellation

    t = threading.Thread(target=cancel_when_running, daemon=True)
    t.start()
    started = time.monotonic()
    states = f()
    t.join(5)
    assert time.monotonic() - started < 30
    assert all(s.is_cancelled() for s in states), states
    assert {r.status for r in sandboxes_of(modal_server, run_ids[0])} == {"terminated"}


def test_flow_run_left_running_is_cleaned_by_terminate_sandboxes(
    make_runner, modal_server, credentials
):
    import threading

    @task
    def sleepy() -> None:
        time.sleep(60)

    run_ids: list[str] = []
    reports: list = []

    def operator() -> None:
        wait_until(
            lambda: (
                run_ids
                and [r for r in sandboxes_of(modal_server, run_ids[0]) if r.status == "running"]
            ),
            timeout=30,
        )
        reports.extend(flow_run_sandboxes(run_ids[0], client=modal_server.client))
        reports.append(terminate_sandboxes(flow_run_id=run_ids[0], client=modal_server.client))

    @flow(task_runner=make_runner())
    def f():
        run_ids.append(flow_run_id())
        fut = sleepy.submit()
        fut.wait()
        return [fut.state]

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    (state,) = f()
    t.join(10)
    *found, terminated = reports
    assert [r.live_status for r in found] == ["running"]
    assert terminated == [found[0].sandbox_id]
    assert state.is_failed() and "exit code 137" in state.message
    after = flow_run_sandboxes(run_ids[0], client=modal_server.client)
    assert [r.live_status for r in after] == ["terminated"]
    assert after[0].record is not None and after[0].record.status == "terminated"


# -- logs, artifacts, secrets --------------------------------------------------------------


def test_output_streams_into_task_logs_with_levels(make_runner):
    @task
    def chatty() -> None:
        import logging as pylogging
        import sys as pysys

        print("plain print line")
        pylogging.getLogger("user.module").info("info from logging")
        pylogging.getLogger("user.module").error("error from logging")
        pysys.stderr.write("raw stderr line\n")

    @flow(task_runner=make_runner())
    def f():
        fut = chatty.submit()
        fut.wait()
        return fut.task_run_id

    task_run_id = f()
    with get_client(sync_client=True) as client:
        logs = wait_until(
            lambda: (
                (
                    found := client.read_logs(
                        log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
                    )
                )
                and any("raw stderr line" in x.message for x in found)
                and found
            ),
            timeout=15,
        )
    levels = {x.message: x.level for x in logs}
    assert levels["plain print line"] == logging.INFO
    assert levels["[user.module] info from logging"] == logging.INFO
    assert levels["[user.module] error from logging"] == logging.ERROR
    assert levels["raw stderr line"] == logging.WARNING
    assert any(m.startswith("Running in Modal sandbox sb-") for m in levels)


def test_artifact_writer_keeps_one_client_and_drops_stale_running_records(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a Prefect client costs ten times a write: the writer thread keeps one
    until `flush()`; a "running" record whose sandbox has finished is not sent."""
    import threading

    import prefect.client.orchestration as orchestration

    from prefect_modal.core.artifacts import SandboxArtifact
    from prefect_modal.task_runner.artifact_writer import ArtifactWriter

    opened: list[object] = []  # clients asked for by the writer's thread (not Prefect's own)
    real_get_client = orchestration.get_client

    def counting_get_client(*args: object, **kwargs: object) -> object:
        client = real_get_client(*args, **kwargs)  # type: ignore[call-overload]
        if threading.current_thread().name.startswith("prefect-modal-artifacts"):
            opened.append(client)
        return client

    monkeypatch.setattr(orchestration, "get_client", counting_get_client)

    def record(n: int, status: str) -> SandboxArtifact:
        return SandboxArtifact(
            sandbox_id=f"sb-writer-{n}",
            app_name="prefect-modal",
            target="local",
            flow_run_id=get_run_context().flow_run.id,
            mode="pipeline",
            status=status,  # type: ignore[arg-type]
        )

    @flow
    def f() -> str:
        writer = ArtifactWriter()
        for n in range(3):
            writer.write(record(n, "succeeded"))
        writer.write(record(9, "running"), wanted=lambda: False)
        writer.flush(timeout=30)
        assert len(opened) == 1  # three writes, one client
        writer.write(record(3, "succeeded"))
        writer.flush(timeout=30)
        assert len(opened) == 2  # flush closed it; the next write opened another
        return flow_run_id()

    run_id = f()
    written = {r.sandbox_id: r.status for r in read_sandbox_artifacts(run_id)}
    assert written == {f"sb-writer-{n}": "succeeded" for n in range(4)}


def test_artifacts_per_task_and_per_flow(make_runner):
    """Without reuse each call's sandbox is its task run's artifact (warm sandboxes have
    one per sandbox: test_warm_sandboxes)."""

    @task
    def fails() -> None:
        raise RuntimeError("nope")

    @flow(task_runner=make_runner(spec=SandboxSpec(cpu=1), reuse_sandboxes=False))
    def f():
        ok = double.submit(2)
        with modal_options(memory="256MiB"):
            bad = fails.submit()
        bad.wait()
        return ok.result(), ok.task_run_id, bad.task_run_id, flow_run_id()

    _, ok_id, bad_id, run_id = f()
    records = {r.task_run_id: r for r in read_sandbox_artifacts(run_id)}
    assert set(records) == {ok_id, bad_id}
    ok, bad = records[ok_id], records[bad_id]
    assert ok.status == "succeeded" and ok.exit_code == 0 and ok.sandbox_id.startswith("sb-")
    assert bad.status == "failed" and bad.exit_code == 1
    assert bad.resources["memory_mib"] == 256 and bad.resources["cpu"] == 1.0
    assert ok.app_name == "prefect-modal" and ok.target == "local" and ok.mode == "per_step"
    assert ok.ended_at and ok.ended_at >= ok.started_at and ok.attempt == 1
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[summary_artifact_key(run_id)])
            )
        )
        on_task_run = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[task_artifact_key(ok_id)]))
        )
    assert task_artifact_key(ok_id) == f"modal-sandbox-{ok_id.hex}"
    assert on_task_run and {a.task_run_id for a in on_task_run} == {ok_id}
    assert ok.sandbox_id in str(summary.data) and bad.sandbox_id in str(summary.data)


def test_secrets_reach_the_task_but_no_artifact_log_or_plain_env(make_runner, modal_server):
    secret_value = "tok-s3cret-9f8e7d"

    @task
    def uses_secrets() -> dict:
        return {
            "token_len": len(os.environ["API_TOKEN"]),
            "named": os.environ["NAMED_SECRET_VALUE"] == "n4med-s3cret",
            "mode": os.environ["MODE"],
        }

    runner = make_runner(spec=SandboxSpec(secrets=["runner-secret"], env={"MODE": "fast"}))
    with modal_options(env={"API_TOKEN": secret_value}):
        spec = runner.options_for(uses_secrets).spec
    # Secret-named variables travel as a modal.Secret, never as plain env=.
    assert spec.plain_env() == {"MODE": "fast"} and spec.secret_env() == {"API_TOKEN": secret_value}
    assert secret_value not in repr(spec) and secret_value not in str(spec.describe())

    @flow(task_runner=runner)
    def f():
        with modal_options(env={"API_TOKEN": secret_value}):
            fut = uses_secrets.submit()
        return fut.result(), fut.task_run_id, flow_run_id()

    out, task_run_id, run_id = f()
    assert out == {"token_len": len(secret_value), "named": True, "mode": "fast"}
    (record,) = sandboxes_of(modal_server, run_id)
    assert "runner-secret" in record.secret_names
    assert secret_value not in repr(record) and "n4med-s3cret" not in repr(record)
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        logs = wait_until(
            lambda: client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
            ),
            timeout=15,
        )
    assert artifacts and logs
    text = " ".join(str(a.data) + str(a.description) for a in artifacts)
    text += " ".join(x.message for x in logs)
    assert "API_TOKEN" in text  # the name is listed, the value never
    assert secret_value not in text and "n4med-s3cret" not in text


def test_function_defined_in_main_runs(prefect_api, modal_server, tmp_path):
    env = _flow_process_env(prefect_api, modal_server, tmp_path)
    proc = subprocess.run(
        [sys.executable, str(HERE / "cancel_flow.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result and result[0].split()[1] == "42" and result[0].split()[2].startswith("sb-")


def test_zero_config_starts_a_local_server_with_a_notice(prefect_api, caplog, monkeypatch):
    """No credentials anywhere (HOME and MODAL_* are isolated): the local server, with one line."""
    from prefect_modal.core import targets

    monkeypatch.delenv("PREFECT_MODAL_TARGET", raising=False)
    if targets.local_server() is not None:
        pytest.skip(reason="a local server was already started in this process by another test")

    @task
    def where() -> str | None:
        return os.environ.get("MODAL_SANDBOX_ID")

    @flow(task_runner=ModalTaskRunner())
    def f():
        return where.submit().result()

    with caplog.at_level(logging.WARNING, logger="prefect_modal"):
        sandbox_id = f()
    assert sandbox_id and sandbox_id.startswith("sb-")
    notices = [
        r.getMessage() for r in caplog.records if "no Modal credentials found" in r.getMessage()
    ]
    assert len(notices) == 1 and "modal token new" in notices[0]
    server = targets.local_server()
    assert server is not None and sandbox_id in {r.id for r in server.sandboxes()}
