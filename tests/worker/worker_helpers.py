"""Processes and helpers of the worker tests (imported by conftest.py and the tests).

Everything runs on 127.0.0.1 with its own PREFECT_HOME, SQLite database and
HOME, and every process started here is stopped by its pid (its whole process
group) and checked gone afterwards.  The local Modal server runs standalone,
not inside the worker, so that killing a worker leaves its sandboxes running,
as on Modal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from prefect_modal import tags
from prefect_modal.local import SandboxRecord, make_client, read_listing

VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")
FLOWS_DIR = Path(__file__).parent / "flows"
MAIN_POOL = "modal-main"
#: The shared worker's Prefect API key: the OSS server ignores it, the sandbox
#: must receive it as a secret, and no log, artifact or listing may show it.
API_KEY = "pnu_worker-test-api-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    """Stop a process we started (its process group), then make sure it is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:  # leftovers of its group (e.g. a server's children)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    assert not pid_alive(proc.pid), f"process {proc.pid} survived"


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no developer HOME, Modal profile or Prefect profile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODAL_"))}
    env.update(
        HOME=str(home),
        MODAL_CONFIG_PATH=str(home / ".modal.toml"),
        PREFECT_HOME=str(home / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class PrefectServer:
    url: str
    proc: subprocess.Popen[Any]
    home: Path

    def env(self, home: Path) -> dict[str, str]:
        return base_env(home) | {"PREFECT_API_URL": self.url}


@dataclass
class ModalServer:
    url: str
    env: dict[str, str]
    state_dir: Path
    proc: subprocess.Popen[Any]
    _client: Any = None

    def sandboxes(self) -> list[SandboxRecord]:
        return read_listing(self.state_dir / "sandboxes.json")

    def for_run(
        self, flow_run_id: UUID | str, role: str | None = "flow-run"
    ) -> list[SandboxRecord]:
        return [
            r
            for r in self.sandboxes()
            if r.tags.get(tags.FLOW_RUN) == str(flow_run_id)
            and (role is None or r.tags.get(tags.ROLE) == role)
        ]

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(
                self.url, self.env["MODAL_TOKEN_ID"], self.env["MODAL_TOKEN_SECRET"]
            )
        return self._client


@dataclass
class WorkerProcess:
    pool: str
    name: str
    log_path: Path
    proc: subprocess.Popen[Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    with_type: bool = True

    def start(self, timeout: float = 60) -> WorkerProcess:
        args = [PREFECT, "worker", "start", "--pool", self.pool, "--name", self.name]
        if self.with_type:
            args += ["--type", "modal"]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(self.log_path.parent),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "started!" in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"worker did not start:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no cleanup runs."""
        assert self.proc is not None
        stop_process(self.proc, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not become ready in {timeout}s")


# -- helpers for tests -----------------------------------------------------------


def create_pool(api: Any, name: str, variable_defaults: dict[str, Any] | None = None) -> None:
    """A `modal` pool with the worker's default template (optionally new defaults)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from prefect_modal.worker import ModalWorker

    template = ModalWorker.get_default_base_job_template()
    for key, value in (variable_defaults or {}).items():
        template["variables"]["properties"][key]["default"] = value
    try:
        api.create_work_pool(WorkPoolCreate(name=name, type="modal", base_job_template=template))
    except ObjectAlreadyExists:
        pass


def deploy(
    api: Any,
    pool: str,
    entrypoint: str,
    name: str,
    job_variables: dict[str, Any] | None = None,
    pull_steps: list[dict[str, Any]] | None = None,
) -> UUID:
    """A deployment whose code is reached through a pull step (no Docker needed)."""
    flow_name = entrypoint.split(":")[1].replace("_", "-")
    flow_id = api.create_flow_from_name(flow_name)
    steps = (
        pull_steps
        if pull_steps is not None
        else [{"prefect.deployments.steps.set_working_directory": {"directory": str(FLOWS_DIR)}}]
    )
    return api.create_deployment(
        flow_id=flow_id,
        name=name,
        entrypoint=entrypoint,
        work_pool_name=pool,
        job_variables=job_variables or {},
        pull_steps=steps,
    )


def start_run(api: Any, deployment_id: UUID, **parameters: Any) -> UUID:
    return api.create_flow_run_from_deployment(deployment_id, parameters=parameters).id


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_final(api: Any, flow_run_id: UUID, timeout: float = 90) -> Any:
    def final() -> Any:
        run = api.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_for(final, timeout, f"flow run {flow_run_id} to finish")


def flow_run_logs(api: Any, flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = api.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
        limit=200,
        offset=0,
    )
    return [log.message for log in logs]
