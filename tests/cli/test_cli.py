"""`prefect-modal status | logs | cancel` as a user runs them, and the services behind the demo.

Every command is the installed console script in its own process, with its own
HOME, pointed at a real Prefect server and the local Modal server (started with
`prefect_modal.services`, as `prefect-modal demo` starts them).  What the CLI
says is checked against what the local server itself reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from live_servers import LiveServers, flow_run_id_of, pointed_at
from prefect import flow, task
from waiting import wait_for

from prefect_modal import ModalTaskRunner
from prefect_modal.cli.services import (
    Service,
    ServiceError,
    free_port,
    pid_alive,
    spawn,
    start_local_modal,
    tool,
    wait_ready,
)
from prefect_modal.local import SandboxRecord

PREFECT_MODAL = tool("prefect-modal")
WORDS = ["alpha", "bravo"]


@task
def echo(word: str) -> str:
    print(f"cli-check says {word}")
    return word


@flow(task_runner=ModalTaskRunner(reuse_sandboxes=False))
def cli_flow(words: list[str]) -> list[str]:
    """A sandbox per call, so each word has its own (warm sandboxes: `warm_flow`)."""
    return [future.result() for future in echo.map(words)]


@flow(task_runner=ModalTaskRunner(max_parallelism=1))
def warm_flow(words: list[str]) -> list[str]:
    """One warm sandbox serves every call, one after another."""
    return [future.result() for future in echo.map(words)]


@flow
def no_sandbox_flow() -> int:
    return 1


@dataclass(frozen=True)
class FinishedRun:
    flow_run_id: str
    flow_run_name: str
    sandbox_ids: list[str]


def run_cli(
    servers: LiveServers, home: Path, *args: str, modal: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFECT_MODAL, *args],
        env=servers.child_env(home, modal=modal),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit code non-zero, nothing on stdout, exactly one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(servers: LiveServers, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """A completed per-step flow run with one sandbox per word."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("flow-home")))
        with pointed_at(servers, mp):
            state = cli_flow(WORDS, return_state=True)
            assert state.is_completed(), state.message
            assert state.result() == WORDS
            from prefect.client.orchestration import get_client

            run_id = flow_run_id_of(state)
            with get_client(sync_client=True) as client:
                name = client.read_flow_run(uuid.UUID(run_id)).name
    listed = servers.sandboxes_of(run_id)
    assert len(listed) == len(WORDS) and {r.status for r in listed} == {"exited"}
    return FinishedRun(run_id, name, sorted(r.id for r in listed))


# -- status -------------------------------------------------------------------------------


def test_status_of_a_flow_run_lists_its_sandboxes(
    servers: LiveServers, finished_run: FinishedRun, tmp_path: Path
) -> None:
    result = run_cli(servers, tmp_path, "status", finished_run.flow_run_id)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "sb-" in line]
    shown = sorted(word for row in rows for word in row.split() if word.startswith("sb-"))
    # each sandbox once in its own column (the "see" column repeats it in the hint)
    assert sorted(set(shown)) == finished_run.sandbox_ids
    assert len(rows) == len(WORDS)
    for row in rows:
        assert "echo" in row and "succeeded" in row and "prefect-modal logs sb-" in row
    assert "DeprecationError" not in result.stderr and "Listing Sandboxes" not in result.stderr
    text = " ".join(result.stdout.split())
    assert "Estimated cost $" in text and "An estimate, not a bill." in text
    assert all("$0.0" in row for row in rows)  # each sandbox's estimate


def test_status_of_a_run_without_sandboxes_says_so(
    servers: LiveServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pointed_at(servers, monkeypatch):
        run_id = flow_run_id_of(no_sandbox_flow(return_state=True))
    result = run_cli(servers, tmp_path, "status", run_id)
    assert result.returncode == 0, result.stderr
    assert f"Flow run {run_id} has no Modal sandboxes." in result.stdout


def test_status_without_an_id_lists_recent_runs(
    servers: LiveServers, finished_run: FinishedRun, tmp_path: Path
) -> None:
    result = run_cli(servers, tmp_path, "status")
    assert result.returncode == 0, result.stderr
    assert "Latest flow runs" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if finished_run.flow_run_id in line]
    assert finished_run.flow_run_name in row
    assert "Completed" in row
    assert f"{len(WORDS)} succeeded" in row
    assert "$0.0" in row
    assert "Estimated cost of these runs' sandboxes: $" in " ".join(result.stdout.split())


# -- logs ---------------------------------------------------------------------------------


def test_logs_prints_what_the_task_printed(
    servers: LiveServers, finished_run: FinishedRun, tmp_path: Path
) -> None:
    # Which sandbox ran which word is the server's business: find "alpha"'s by its output.
    outputs = {}
    for sandbox_id in finished_run.sandbox_ids:
        result = run_cli(servers, tmp_path, "logs", sandbox_id)
        assert result.returncode == 0, result.stderr
        assert f"{sandbox_id} exited with code 0" in result.stderr
        outputs[sandbox_id] = result.stdout
    assert sorted(outputs.values()) == [f"cli-check says {word}\n" for word in WORDS]
    # nothing of the runner's private result channel, no origin markers
    for text in outputs.values():
        assert "\x1f" not in text and " END" not in text and "HELLO" not in text


def test_status_and_logs_of_a_warm_sandbox_show_every_call(
    servers: LiveServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    words = ["charlie", "delta", "echo"]
    with pointed_at(servers, monkeypatch):
        state = warm_flow(words, return_state=True)
        assert state.result() == words
        run_id = flow_run_id_of(state)
    (only,) = servers.sandboxes_of(run_id)
    status = run_cli(servers, tmp_path, "status", run_id)
    assert status.returncode == 0, status.stderr
    rows = [line for line in status.stdout.splitlines() if only.id in line]
    assert rows and "succeeded" in rows[0], status.stdout
    assert "3 calls:" in rows[0], status.stdout
    logs = run_cli(servers, tmp_path, "logs", only.id)
    assert logs.returncode == 0, logs.stderr
    # one sandbox's output, every call's line (in the order the calls reached it)
    assert sorted(logs.stdout.splitlines()) == [f"cli-check says {word}" for word in words]


# -- cancel -------------------------------------------------------------------------------

SLEEPY_FLOW = """
import time

from prefect import flow, task

from prefect_modal import ModalTaskRunner


@task
def nap(seconds: float) -> str:
    print("napping in the sandbox", flush=True)
    time.sleep(seconds)
    return "woke up"


@flow(task_runner=ModalTaskRunner())
def sleepy(seconds: float = 600) -> str:
    return nap.submit(seconds).result()


if __name__ == "__main__":
    sleepy()
"""


@pytest.fixture
def flow_process(servers: LiveServers, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A per-step flow whose task sleeps 10 minutes, run as a user runs it (a script)."""
    script = tmp_path / "sleepy.py"
    script.write_text(textwrap.dedent(SLEEPY_FLOW))
    log = (tmp_path / "flow.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=servers.child_env(tmp_path / "flow-home"),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()
        assert not pid_alive(proc.pid)


def test_cancel_terminates_the_sandbox_and_cancels_the_run(
    servers: LiveServers,
    flow_process: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    def running_nap() -> SandboxRecord | None:
        assert flow_process.poll() is None, (tmp_path / "flow.log").read_text()
        return next(
            (
                r
                for r in servers.sandboxes()
                if r.tags.get("prefect.task-name") == "nap"
                and r.status == "running"
                and r.pid
                and pid_alive(r.pid)
            ),
            None,
        )

    sandbox = wait_for(running_nap, 120, "the flow's sandbox to run")
    run_id = sandbox.tags["prefect.flow-run-id"]
    assert sandbox.pid is not None
    pid = sandbox.pid

    result = run_cli(servers, tmp_path, "cancel", run_id)
    assert result.returncode == 0, result.stderr
    assert f"Terminated 1 sandbox(es) ({sandbox.id}); flow run {run_id} is Cancelled." in (
        result.stdout
    )

    wait_for(lambda: not pid_alive(pid), 30, f"sandbox process {pid} to end")
    (after,) = [r for r in servers.sandboxes() if r.id == sandbox.id]
    assert after.status == "terminated" and after.returncode == 137
    assert not [r for r in servers.sandboxes_of(run_id) if r.status == "running"]

    # The flow's own process sees its task's sandbox killed and ends; the run stays
    # Cancelled (not the Failed that process reports).
    flow_process.wait(120)
    with pointed_at(servers, monkeypatch), get_client(sync_client=True) as client:
        state = client.read_flow_run(uuid.UUID(run_id)).state
    assert state is not None and state.type == StateType.CANCELLED, state

    # and `status` agrees
    status = run_cli(servers, tmp_path, "status", run_id)
    assert status.returncode == 0, status.stderr
    assert any(sandbox.id in line and "terminated" in line for line in status.stdout.splitlines())


# -- errors: one clear line, non-zero exit ---------------------------------------------------


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_a_bad_flow_run_id_is_refused(servers: LiveServers, tmp_path: Path, command: str) -> None:
    result = run_cli(servers, tmp_path, command, "not-a-uuid")
    assert_one_line_error(result, "'not-a-uuid' is not a flow run id")


def test_logs_of_an_unknown_sandbox(servers: LiveServers, tmp_path: Path) -> None:
    result = run_cli(servers, tmp_path, "logs", "sb-v2-000000000000000000000000")
    assert_one_line_error(result, "No sandbox 'sb-v2-000000000000000000000000'")


def test_cancel_of_an_unknown_flow_run(servers: LiveServers, tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    result = run_cli(servers, tmp_path, "cancel", run_id)
    assert_one_line_error(result, f"No flow run {run_id}")


SOME_RUN = str(uuid.UUID(int=1))


@pytest.mark.parametrize(
    "args",
    [("status", SOME_RUN), ("logs", "sb-abc"), ("cancel", SOME_RUN)],
    ids=["status", "logs", "cancel"],
)
def test_no_credentials_at_all(servers: LiveServers, tmp_path: Path, args: tuple[str, str]) -> None:
    """No MODAL_* variables and an empty HOME: a hint, not a local server of its own."""
    assert not (tmp_path / "home" / ".modal.toml").exists()
    result = run_cli(servers, tmp_path / "home", *args, modal=False)
    assert_one_line_error(result, "No Modal credentials found")
    assert "prefect-modal local serve" in result.stderr
    assert not (tmp_path / "home" / ".modal.toml").exists()


# -- prefect_modal.services ------------------------------------------------------------------


def test_free_port_is_free_on_loopback() -> None:
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nobody holds it


def test_service_stop_leaves_no_process(tmp_path: Path) -> None:
    """A leader that ignores SIGTERM and a child of it: both gone after stop()."""
    code = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("CHILD", child.pid, flush=True)
        time.sleep(600)
        """
    )
    service = spawn("stubborn", [sys.executable, "-c", code], os.environ, tmp_path)

    def child_pid() -> int | None:
        for line in service.log_tail().splitlines():
            if line.startswith("CHILD "):
                return int(line.split()[1])
        return None

    child: int = wait_for(child_pid, 60, "the child to start")
    assert pid_alive(service.pid) and pid_alive(child)
    service.stop(timeout=1)
    assert not pid_alive(service.pid)
    wait_for(lambda: not pid_alive(child), 10, f"child {child} to be killed with its group")


def test_a_service_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    service = spawn(
        "doomed",
        [sys.executable, "-c", "import sys; print('bad config: port taken'); sys.exit(3)"],
        os.environ,
        tmp_path,
    )
    with pytest.raises(ServiceError, match="doomed exited with code 3") as err:
        wait_ready(service, lambda: False, 60, "became ready")
    assert "bad config: port taken" in str(err.value)
    assert str(tmp_path / "doomed.log") in str(err.value)
    assert not pid_alive(service.pid)


def test_start_local_modal_prints_how_to_reach_it(tmp_path: Path) -> None:
    service: Service = start_local_modal(tmp_path / "modal", port=free_port())
    try:
        assert service.url is not None and service.url.startswith("http://127.0.0.1:")
        assert set(service.env) >= {"MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"}
        assert service.env["MODAL_SERVER_URL"] == service.url
    finally:
        service.stop()
    assert not pid_alive(service.pid)
