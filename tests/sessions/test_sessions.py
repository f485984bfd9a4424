"""SandboxSession against the local Modal server and Prefect's test harness."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from deployment_runs import execute_in_a_process, failure_report, run_of_entrypoint
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import get_run_context
from prefect.states import Cancelling
from session_support import running_sessions
from waiting import wait_for

from prefect_modal import ModalSandboxConfig, SandboxSession, SandboxSnapshot, SandboxSpec
from prefect_modal.local import LocalModal
from prefect_modal.sessions import SESSION_KEY_PREFIX, SessionEndedError, SessionUnavailableError
from prefect_modal.status import flow_run_sandboxes

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def _logs(flow_run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )


def _wait_logs(flow_run_id: Any, needle: str) -> list[Any]:
    return wait_for(
        lambda: (logs := _logs(flow_run_id)) and any(needle in r.message for r in logs) and logs,
        timeout=20,
        what=f"a log line with {needle!r}",
    )


def _status(server: LocalModal, sandbox_id: str) -> str:
    return next(s.status for s in server.sandboxes() if s.id == sandbox_id)


def _session_artifacts(flow_run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=SESSION_KEY_PREFIX)),
            limit=200,
        )
    return [a for a in found if a.flow_run_id == flow_run_id]


# -- exec and logs -----------------------------------------------------------------------------


def test_exec_output_streams_into_the_task_runs_logs(prefect_api, credentials, modal_server):
    @task
    def run_commands() -> dict[str, Any]:
        with SandboxSession.create(credentials=credentials) as session:
            res = session.exec(
                "sh", "-c", "echo out-line-1; echo err-line-1 >&2; echo out-line-2; exit 3"
            )
            lines = list(session.exec_stream("sh", "-c", "echo a; echo b >&2; echo c"))
            quiet = session.exec("sleep", "5", timeout=1)
            return {
                "id": session.session_id,
                "rc": res.returncode,
                "stdout": res.stdout,
                "stderr": res.stderr,
                "lines": [(line.stream, line.text) for line in lines],
                "timed_out": quiet.timed_out,
                "task_run_id": str(get_run_context().task_run.id),
            }

    @flow
    def f() -> tuple[Any, dict[str, Any]]:
        return get_run_context().flow_run.id, run_commands()

    flow_run_id, out = f()
    assert out["rc"] == 3
    assert out["stdout"] == "out-line-1\nout-line-2\n" and out["stderr"] == "err-line-1\n"
    assert ("stdout", "a") in out["lines"] and ("stderr", "b") in out["lines"]
    assert [t for s, t in out["lines"] if s == "stdout"] == ["a", "c"]
    assert out["timed_out"] is True
    logs = _wait_logs(flow_run_id, "err-line-1")
    mine = [r for r in logs if str(r.task_run_id) == out["task_run_id"]]
    by_text = {r.message.split("] ", 1)[-1]: r.level for r in mine if "[session" in r.message}
    assert by_text["out-line-1"] == 20 and by_text["out-line-2"] == 20  # INFO
    assert by_text["err-line-1"] == 30  # WARNING
    assert _status(modal_server, out["id"]) == "terminated"


def test_exec_in_the_flow_body_logs_on_the_flow_run(prefect_api, credentials):
    @flow
    def f() -> tuple[Any, int]:
        with SandboxSession.create(credentials=credentials) as session:
            return get_run_context().flow_run.id, session.exec("echo", "from-flow-body").returncode

    flow_run_id, rc = f()
    logs = _wait_logs(flow_run_id, "from-flow-body")
    line = next(r for r in logs if "from-flow-body" in r.message)
    assert rc == 0 and line.task_run_id is None and line.level == 20


# -- files -------------------------------------------------------------------------------------


def test_files_round_trip(credentials, modal_server):
    blob = bytes(range(256)) * 64
    with SandboxSession.create(credentials=credentials) as session:
        session.write_text("/files/dir/hello.txt", "héllo sessions")
        session.write_bytes("/files/blob.bin", blob)
        assert session.read_text("/files/dir/hello.txt") == "héllo sessions"
        assert session.read_bytes("/files/blob.bin") == blob
        entries = {f.name: f for f in session.list_files("/files")}
        assert set(entries) == {"dir", "blob.bin"}
        assert entries["dir"].type == "directory" and entries["blob.bin"].size == len(blob)
        # the sandbox's processes see the same files
        assert session.exec("cat", "/files/dir/hello.txt").stdout == "héllo sessions"
        session.remove("/files/blob.bin")
        session.remove("/files/dir", recursive=True)
        assert session.list_files("/files") == []
        with pytest.raises(FileNotFoundError, match="/files/missing"):
            session.read_text("/files/missing")
        with pytest.raises(ValueError, match=r"path='relative.txt' must be an absolute path"):
            session.write_text("relative.txt", "x")
        assert not Path("/files/dir/hello.txt").exists()  # the sandbox's own root, not ours


# -- snapshot, restore, attach -----------------------------------------------------------------


def test_snapshot_in_one_task_restore_in_another(prefect_api, credentials, modal_server):
    @task(persist_result=True, result_serializer="json")
    def build() -> SandboxSnapshot:
        with SandboxSession.create(SandboxSpec(env={"MODE": "fast"}), credentials=credentials) as s:
            s.write_text("/opt/app/state.txt", "prepared\n")
            return s.snapshot()

    @task
    def use(snapshot: SandboxSnapshot) -> str:
        with SandboxSession.restore(snapshot, credentials=credentials) as s:
            return s.exec("sh", "-c", "cat /opt/app/state.txt; echo $MODE").stdout

    @flow
    def f() -> tuple[SandboxSnapshot, str]:
        snap = build()
        return snap, use(snap)

    snap, out = f()
    assert out == "prepared\nfast\n"
    assert snap.image_id.startswith("im-") and snap.target == "local"
    again = SandboxSnapshot.model_validate_json(snap.model_dump_json())  # JSON round trip
    assert again == snap


def test_snapshot_keeps_no_secret_value(credentials):
    secret = "s3cret-session-value-77"
    spec = SandboxSpec(env={"API_TOKEN": secret, "MODE": "x"})
    with SandboxSession.create(spec, credentials=credentials) as session:
        assert session.exec("sh", "-c", "echo $API_TOKEN").stdout == secret + "\n"
        snap = session.snapshot()
    text = snap.model_dump_json()
    assert secret not in text and secret not in repr(snap)
    assert snap.secret_env_names == ["API_TOKEN"] and snap.spec.env == {"MODE": "x"}
    with SandboxSession.restore(
        snap, SandboxSpec(env={"API_TOKEN": secret}), credentials=credentials
    ) as restored:
        assert restored.exec("sh", "-c", "echo $API_TOKEN $MODE").stdout == f"{secret} x\n"


def test_secret_env_values_stay_out_of_logs_and_artifacts(prefect_api, credentials):
    secret = "s3cret-in-logs-4242"

    @flow
    def f() -> Any:
        spec = SandboxSpec(env={"DB_PASSWORD": secret})
        with SandboxSession.create(spec, credentials=credentials) as session:
            session.exec("sh", "-c", "echo pw=$DB_PASSWORD; echo marker-done")
        return get_run_context().flow_run.id

    flow_run_id = f()
    logs = _wait_logs(flow_run_id, "marker-done")
    assert any("pw=***" in r.message for r in logs)
    assert not any(secret in r.message for r in logs)
    artifacts = _session_artifacts(flow_run_id)
    assert artifacts and not any(secret in json.dumps(a.data) for a in artifacts)


def test_attach_by_id_from_another_task_and_keep_ends_with_the_flow(
    prefect_api, credentials, modal_server
):
    @task
    def open_session() -> str:
        session = SandboxSession.create(credentials=credentials, keep=True)
        session.write_text("/data/note.txt", "left by task one")
        return session.session_id

    @task
    def read_it(session_id: str) -> str:
        attached = SandboxSession.attach(session_id, credentials=credentials)
        return attached.read_text("/data/note.txt") + "|" + attached.exec("echo", "hi").stdout

    @flow
    def f() -> tuple[Any, str, str, str]:
        sid = open_session()
        status_after_task = _status(modal_server, sid)  # kept: it outlived its task
        return get_run_context().flow_run.id, sid, read_it(sid), status_after_task

    flow_run_id, sid, text, status_after_task = f()
    assert text == "left by task one|hi\n"
    assert status_after_task == "running"
    ended = time.monotonic()
    wait_for(
        lambda: _status(modal_server, sid) == "terminated",
        timeout=10,
        what="the kept session to end",
    )
    assert time.monotonic() - ended < 5
    with pytest.raises(SessionEndedError, match=rf"session {sid} has finished \(exit code 137"):
        SandboxSession.attach(sid, credentials=credentials)
    reports = {r.sandbox_id: r for r in flow_run_sandboxes(flow_run_id, client=modal_server.client)}
    assert reports[sid].live_status == "terminated" and reports[sid].record is not None
    assert reports[sid].record.mode == "session"


def test_a_session_without_keep_ends_with_its_task(prefect_api, credentials, modal_server):
    @task
    def leave_it_open() -> str:
        return SandboxSession.create(credentials=credentials).session_id  # no `with`

    @flow
    def f() -> str:
        sid = leave_it_open()
        wait_for(lambda: _status(modal_server, sid) == "terminated", timeout=10, what="its end")
        return sid

    assert _status(modal_server, f()) == "terminated"


# -- Prefect-native: artifact, status, block ---------------------------------------------------


def test_the_artifact_names_the_session(prefect_api, credentials):
    @task
    def work() -> str:
        with SandboxSession.create(SandboxSpec(cpu=0.5), credentials=credentials) as session:
            session.exec("echo", "one")
            session.exec("echo", "two")
            session.exec("echo", "three")
            session.snapshot()
            return session.session_id

    @flow
    def f() -> tuple[Any, str]:
        return get_run_context().flow_run.id, work()

    flow_run_id, sid = f()

    def final() -> tuple[Any, dict[str, Any]] | None:
        for artifact in _session_artifacts(flow_run_id):
            data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            rows = {row["field"]: row["value"] for row in data}
            if rows["status"] == "terminated":
                return artifact, rows
        return None

    latest, rows = wait_for(final, timeout=10, what="the final artifact")
    assert sid in latest.description and "Sandbox session" in latest.description
    assert rows["sandbox_id"] == sid and rows["mode"] == "session"
    assert rows["status"] == "terminated" and rows["link"] == f"prefect-modal logs {sid}"
    assert "echo one" in rows["commands"] and json.loads(rows["snapshots"])[0].startswith("im-")
    assert json.loads(rows["resources"])["cpu"] == 0.5
    # Written once and updated in place: one artifact, so one label on the run's graph
    # (a version per command showed 3-4 of them).
    assert len(_session_artifacts(flow_run_id)) == 1
    assert "echo three" in rows["commands"]


def test_status_lists_a_runs_sessions_live(prefect_api, credentials, modal_server):
    @flow
    def f() -> tuple[Any, str, list[Any]]:
        with SandboxSession.create(credentials=credentials) as session:
            run_id = get_run_context().flow_run.id
            live = flow_run_sandboxes(run_id, client=modal_server.client)
            return run_id, session.session_id, live

    run_id, sid, live = f()
    assert [(r.sandbox_id, r.live_status) for r in live] == [(sid, "running")]
    after = flow_run_sandboxes(run_id, client=modal_server.client)
    assert [(r.sandbox_id, r.live_status) for r in after] == [(sid, "terminated")]


def test_the_block_opens_sessions(prefect_api, credentials):
    config = ModalSandboxConfig(
        spec=SandboxSpec(env={"GREETING": "from-block"}, timeout=300), credentials=credentials
    )
    config.save("session-test-config", overwrite=True)
    loaded = ModalSandboxConfig.load("session-test-config")
    assert loaded.spec.timeout == 300
    with loaded.open_session() as session:
        assert session.exec("sh", "-c", "echo $GREETING").stdout == "from-block\n"
        snap = session.snapshot()
    with loaded.restore_session(snap) as restored:
        assert restored.status == "running"


# -- bad input and places a session cannot go --------------------------------------------------


def test_bad_input_fails_before_any_sandbox(credentials, modal_server):
    before = len(modal_server.sandboxes())
    with pytest.raises(TypeError, match="spec must be a SandboxSpec, not str"):
        SandboxSession.create("cpu=2", credentials=credentials)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keep='yes' must be True or False"):
        SandboxSession.create(credentials=credentials, keep="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu"):
        SandboxSession.create({"cpu": -1}, credentials=credentials)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"session_id='nope' is not a session id"):
        SandboxSession.attach("nope", credentials=credentials)
    with pytest.raises(TypeError, match="snapshot must be a SandboxSnapshot"):
        SandboxSession.restore("im-123", credentials=credentials)  # type: ignore[arg-type]
    assert len(modal_server.sandboxes()) == before
    with SandboxSession.create(credentials=credentials) as session:
        with pytest.raises(ValueError, match="exec\\(\\) needs a command"):
            session.exec()
        with pytest.raises(ValueError, match=r"timeout=0 must be a number of seconds above 0"):
            session.exec("true", timeout=0)
        with pytest.raises(ValueError, match=r"workdir='tmp' must be an absolute path"):
            session.exec("true", workdir="tmp")
        with pytest.raises(TypeError, match=r"got 3 \(int\)"):
            session.exec("echo", 3)  # type: ignore[arg-type]
    with pytest.raises(SessionEndedError, match="has ended"):
        session.exec("true")


def test_inside_a_sandbox_without_credentials_it_fails_clearly(monkeypatch):
    monkeypatch.setenv("MODAL_SANDBOX_ID", "sb-v2-inside")
    with pytest.raises(SessionUnavailableError, match="inside Modal sandbox sb-v2-inside") as err:
        SandboxSession.create()
    assert "@modal_options(local=True)" in str(err.value)


def test_in_a_per_step_task_it_fails_clearly(prefect_api, credentials):
    from prefect_modal import ModalTaskRunner

    @task
    def nested() -> str:
        from prefect_modal import SandboxSession

        try:
            SandboxSession.create()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "opened"

    @flow(task_runner=ModalTaskRunner(credentials=credentials))
    def f() -> str:
        return nested.submit().result()

    out = f()
    assert out.startswith("SessionUnavailableError") and "has no Modal credentials" in out


# -- cancellation ------------------------------------------------------------------------------


def test_cancelling_a_flow_run_ends_its_three_sessions(prefect_api, modal_server, tmp_path):
    run = run_of_entrypoint(
        "three-sessions",
        f"sessions-cancel-{tmp_path.name}",
        f"{HERE / 'session_flows.py'}:three_sessions",
        REPO,
    )
    env = {
        **os.environ,
        **modal_server.env,
        "PREFECT_API_URL": prefect_api,
        "HOME": str(tmp_path),
        "MODAL_CONFIG_PATH": str(tmp_path / ".modal.toml"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    proc = execute_in_a_process(run, env, REPO)

    def ours() -> list[Any]:
        tag = str(run.id)
        return [s for s in modal_server.sandboxes() if s.tags.get("prefect.flow-run-id") == tag]

    def mine() -> list[str]:
        return [s.id for s in ours() if s.status == "running"]

    try:
        wait_for(lambda: len(mine()) == 3, timeout=90, what="three live sessions")
        requested = time.monotonic()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        wait_for(lambda: not mine(), timeout=30, interval=0.05, what="the sessions to end")
        gone_after = time.monotonic() - requested
        proc.wait(60)
    except AssertionError as exc:  # what the flow process said, and its sandboxes
        raise AssertionError(f"{exc}\n{failure_report(proc, ours())}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0] if proc.stdout and not proc.stdout.closed else ""
    assert gone_after < 5, f"sessions still running {gone_after:.1f} s after the cancel\n{output}"
    assert not running_sessions(modal_server)


# -- the example flow --------------------------------------------------------------------------


def test_code_interpreter_hostile_candidate_changes_nothing_on_the_host(
    prefect_api, modal_server, monkeypatch
):
    for key, value in modal_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_MODAL_TARGET", "local")
    sys.path.insert(0, str(REPO / "flows"))
    try:
        import code_interpreter as ci
    finally:
        sys.path.remove(str(REPO / "flows"))
    hosts = Path("/etc/hosts").read_bytes()
    report = ci.code_interpreter()
    results = {r["candidate"]: r for r in report["results"]}
    assert results["sum_numbers"]["exit_code"] == 0 and "5050" in results["sum_numbers"]["stdout"]
    assert results["crashes"]["exit_code"] == 1
    assert "ZeroDivisionError" in results["crashes"]["stderr"]
    hostile = results["hostile"]["stdout"]
    assert "secret found in: no process" in hostile and "network: refused" in hostile
    assert "canary: not reachable" in hostile and "after rm -rf /" in hostile
    assert report["host_untouched"] is True and all(report["host"].values()), report["host"]
    assert Path("/etc/hosts").read_bytes() == hosts and Path("/usr/bin/env").exists()
