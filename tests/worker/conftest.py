"""Real processes for the worker tests: a Prefect server, the local Modal server, workers.

Everything runs on 127.0.0.1 with its own PREFECT_HOME, SQLite database and
HOME, and every process started here is stopped by its pid (its whole process
group) and checked gone afterwards.  The local Modal server runs standalone,
not inside the worker, so that killing a worker leaves its sandboxes running,
as on Modal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import (
    API_KEY,
    FLOWS_DIR,
    MAIN_POOL,
    ModalServer,
    PrefectServer,
    WorkerProcess,
    base_env,
    create_pool,
    pid_alive,
    stop_service,
)

from prefect_modal.cli.services import start_local_modal, start_prefect_server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-server")
    env = base_env(home) | {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    service = start_prefect_server(home, timeout=120, ui=False, base=env)
    try:
        yield PrefectServer(service=service, home=home)
    finally:
        stop_service(service)


#: the deployments the sandboxes run from (pull step: set_working_directory), shown to
#: the local server's sandboxes read-only, as the README tells a user to
DEPLOYMENTS_DIR = Path(__file__).resolve().parents[2] / "deployments"


@pytest.fixture(scope="session")
def modal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModalServer]:
    home = tmp_path_factory.mktemp("modal-server")
    state = home / "state"
    service = start_local_modal(
        state, timeout=60, env=base_env(home), host_dirs=[FLOWS_DIR, DEPLOYMENTS_DIR]
    )
    server = ModalServer(service=service, state_dir=state)
    try:
        yield server
    finally:
        pids = [r.pid for r in server.sandboxes() if r.pid]
        stop_service(service)
        for pid in pids:  # the server kills its sandboxes when it stops
            assert not pid_alive(pid), f"sandbox process {pid} outlived the local server"


@pytest.fixture(scope="session")
def api(prefect_server: PrefectServer) -> Iterator[Any]:
    """A sync Prefect client for the test server (and settings pointing at it)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="session")
def worker_factory(
    prefect_server: PrefectServer,
    modal_server: ModalServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `prefect worker start` processes; all are stopped (by pid) at the end."""
    started: list[WorkerProcess] = []

    def start(
        pool: str,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        with_type: bool = True,
        home: Path | None = None,
    ) -> WorkerProcess:
        home = home or tmp_path_factory.mktemp(f"worker-{pool}")
        env = (
            prefect_server.env(home)
            | modal_server.env
            | {
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            }
            | (extra_env or {})
        )
        worker = WorkerProcess(
            pool=pool,
            name=name or f"worker-{pool}",
            home=home,
            env=env,
            with_type=with_type,
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def main_worker(api: Any, worker_factory: Callable[..., WorkerProcess]) -> WorkerProcess:
    """The shared worker of most tests: pool defaults cpu=2, memory=1GiB (deployments
    override them), and a Prefect API key in its env that must reach sandboxes only
    as a secret.  Started without --type: the type is found from the pool."""
    create_pool(api, MAIN_POOL, {"cpu": 2.0, "memory": "1GiB"})
    return worker_factory(
        MAIN_POOL, name="main-worker", with_type=False, extra_env={"PREFECT_API_KEY": API_KEY}
    )
