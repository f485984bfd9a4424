"""Processes and helpers of the worker tests (imported by conftest.py and the tests).

Everything runs on 127.0.0.1 with its own PREFECT_HOME, SQLite database and
HOME, and every process started here is stopped by its pid (its whole process
group) and checked gone afterwards.  The local Modal server runs standalone,
not inside the worker, so that killing a worker leaves its sandboxes running,
as on Modal.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from waiting import wait_for

from prefect_modal.cli.services import Service, isolated_env, pid_alive, spawn, tool, wait_ready
from prefect_modal.core import tags
from prefect_modal.local import SandboxRecord, make_client, read_listing

PREFECT = tool("prefect")
FLOWS_DIR = Path(__file__).parent / "flows"
MAIN_POOL = "modal-main"
#: The shared worker's Prefect API key: the OSS server ignores it, the sandbox
#: must receive it as a secret, and no log, artifact or listing may show it.
API_KEY = "pnu_worker-test-api-key-0123456789"


def stop_service(service: Service, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process we started (its process group), then make sure it is gone."""
    service.stop(timeout, sig=sig)
    assert not pid_alive(service.pid), f"{service.name} (pid {service.pid}) survived"


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no developer HOME, Modal profile or Prefect profile."""
    return isolated_env(home) | {"PREFECT_SERVER_UI_ENABLED": "false"}


@dataclass
class PrefectServer:
    service: Service
    home: Path

    @property
    def url(self) -> str:
        assert self.service.url is not None
        return self.service.url

    def env(self, home: Path) -> dict[str, str]:
        return base_env(home) | {"PREFECT_API_URL": self.url}


@dataclass
class ModalServer:
    service: Service
    state_dir: Path
    _client: Any = None

    @property
    def url(self) -> str:
        assert self.service.url is not None
        return self.service.url

    @property
    def env(self) -> dict[str, str]:
        """MODAL_SERVER_URL and the token pair, as the server printed them."""
        return self.service.env

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
    """`prefect worker start` run in `home`, its output in `home/worker.log`."""

    pool: str
    name: str
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    with_type: bool = True
    service: Service | None = None

    @property
    def log_path(self) -> Path:
        return self.home / "worker.log"

    def start(self, timeout: float = 60) -> WorkerProcess:
        args = [PREFECT, "worker", "start", "--pool", self.pool, "--name", self.name]
        if self.with_type:
            args += ["--type", "modal"]
        self.service = spawn("worker", args, self.env, self.home, cwd=self.home)
        wait_ready(self.service, lambda: "started!" in self.log(), timeout, "start")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no cleanup runs."""
        assert self.service is not None
        stop_service(self.service, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.service is not None:
            stop_service(self.service)


# -- helpers for tests -----------------------------------------------------------


def create_pool(api: Any, name: str, variable_defaults: dict[str, Any] | None = None) -> None:
    """A `modal` pool with the worker's default template (optionally new defaults)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from prefect_modal.worker.worker import ModalWorker

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
