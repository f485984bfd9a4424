"""Real servers for the UI and CLI tests, started the way `prefect-modal demo` starts them.

`prefect_modal.services` starts a Prefect server (API + UI) and the local Modal
server as process groups on 127.0.0.1 with free ports; `live_servers()` wraps
them for a test module: isolated HOME / Modal config / Prefect home while they
start, everything stopped by pid afterwards and checked gone (the servers and
every sandbox process the local server ran).

Imported by `tests/ui/conftest.py` and `tests/cli/conftest.py` (the rootdir
conftest puts `tests/` on sys.path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prefect_modal.cli.services import (
    Service,
    isolated_env,
    pid_alive,
    start_local_modal,
    start_prefect_server,
)
from prefect_modal.local import SandboxRecord, read_listing

#: The tag every prefect-modal sandbox carries (see `prefect_modal.status`).
FLOW_RUN_TAG = "prefect.flow-run-id"


@dataclass
class LiveServers:
    """A running Prefect server and local Modal server, and how to reach them."""

    prefect: Service
    modal: Service
    state_dir: Path
    root: Path

    @property
    def api_url(self) -> str:
        assert self.prefect.url is not None
        return self.prefect.url

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    @property
    def modal_env(self) -> dict[str, str]:
        """MODAL_SERVER_URL and the token pair, as `prefect-modal local serve` printed them."""
        return dict(self.modal.env)

    def sandboxes(self) -> list[SandboxRecord]:
        """The local server's own listing (written to its state dir as sandboxes change)."""
        return read_listing(self.state_dir / "sandboxes.json")

    def sandboxes_of(self, flow_run_id: object) -> list[SandboxRecord]:
        return [s for s in self.sandboxes() if s.tags.get(FLOW_RUN_TAG) == str(flow_run_id)]

    def child_env(self, home: Path, modal: bool = True) -> dict[str, str]:
        """Environment of a child process (the CLI, a flow): isolated HOME and Prefect
        home, pointed at these servers; `modal=False` leaves out every Modal setting."""
        home.mkdir(parents=True, exist_ok=True)
        env = isolated_env(home)
        env.update(
            PREFECT_API_URL=self.api_url,
            COLUMNS="250",  # rich tables: full ids on one line each
            NO_COLOR="1",
        )
        if modal:
            env.update(self.modal_env)
        return env


@contextmanager
def live_servers(root: Path) -> Iterator[LiveServers]:
    """Start both servers under `root`; stop them by pid at the end and check that
    neither they nor any sandbox process of the local server survived."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:  # what the server processes inherit
        mp.setenv("HOME", str(home))
        mp.setenv("MODAL_CONFIG_PATH", str(home / ".modal.toml"))
        for key in list(os.environ):
            if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
                mp.delenv(key)
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH"):
            mp.delenv(key, raising=False)
        prefect = start_prefect_server(root / "prefect", timeout=150)
        try:
            modal = start_local_modal(root / "modal", timeout=60)
        except BaseException:
            prefect.stop()
            raise
    servers = LiveServers(prefect=prefect, modal=modal, state_dir=root / "modal", root=root)
    try:
        yield servers
    finally:
        sandbox_pids = [r.pid for r in servers.sandboxes() if r.pid]
        modal.stop()
        prefect.stop()
        survivors = [
            f"{name} (pid {pid})"
            for name, pid in [("local Modal server", modal.pid), ("Prefect server", prefect.pid)]
            + [(f"sandbox {r}", r) for r in sandbox_pids]
            if pid_alive(pid)
        ]
        assert not survivors, f"still running after stop: {', '.join(survivors)}"


@contextmanager
def pointed_at(servers: LiveServers, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's Prefect client and Modal config aimed at `servers`.

    Prefect reads its settings once, so the API URL is a temporary setting; the
    modal client reads MODAL_* at each connection, so those are plain env vars.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in servers.modal_env.items():
        monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: servers.api_url}):
        try:
            yield
        finally:
            _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send this process's queued logs and events while their server is still up.

    Prefect keeps one background worker per API URL; one left with items for a
    server that the fixture then stops makes the interpreter wait at exit.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=15, at_exit=False)
        except Exception:  # best effort: never fail a test on housekeeping
            pass


def flow_run_id_of(state: Any) -> str:
    """The flow run id of a final state returned by `flow(..., return_state=True)`."""
    return str(state.state_details.flow_run_id)
