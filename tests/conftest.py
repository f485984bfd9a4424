"""Shared fixtures: an isolated modal configuration and the embedded local Modal server.

The modal client reads ``~/.modal.toml`` (or ``MODAL_CONFIG_PATH``) and the
active profile *once, when ``modal`` is imported*, and ``MODAL_*`` variables on
every call. Tests must never see a developer's real profile or token, so this
module points ``MODAL_CONFIG_PATH`` at an empty file and drops ``MODAL_*``
variables before anything imports ``modal``, and every test runs with the
``MODAL_*`` environment scrubbed again and its own HOME (monkeypatch restores
both afterwards).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_MODAL_CONFIG_DIR = tempfile.mkdtemp(prefix="prefect-modal-tests-")
os.environ["MODAL_CONFIG_PATH"] = str(Path(_MODAL_CONFIG_DIR) / ".modal.toml")
for _key in [k for k in os.environ if k.startswith("MODAL_") and k != "MODAL_CONFIG_PATH"]:
    del os.environ[_key]
if "modal.config" in sys.modules:  # imported earlier (a plugin?): forget what it read
    sys.modules["modal.config"]._user_config = {}  # type: ignore[attr-defined]

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from prefect_modal.cli import services  # noqa: E402
from prefect_modal.local import LocalModal  # noqa: E402

# Each test gets a HOME of its own (below), but image layers and uv's wheels stay in
# the machine's caches, shared by every test's server, as by every local server.
os.environ.update(services.shared_build_caches(os.environ))


@pytest.fixture(autouse=True)
def _isolated_modal_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per test: a fresh HOME (no ~/.modal.toml, no ~/.prefect-modal) and no MODAL_* variables."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    for key in list(os.environ):
        if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(Path(_MODAL_CONFIG_DIR) / ".modal.toml"))


@pytest.fixture(scope="session")
def local_modal_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModal]:
    """One server for the whole session, for tests that only need *a* server."""
    state = tmp_path_factory.mktemp("local-modal-session")
    with LocalModal(state_dir=state) as lm:
        yield lm


@pytest.fixture
def local_modal(tmp_path: Path) -> Iterator[LocalModal]:
    """A fresh local Modal server for one test, stopped (no process left) afterwards.

    ``local_modal.client`` is a modal.Client for it; ``local_modal.env`` is what
    a child process needs (MODAL_SERVER_URL + token pair). Its state (sandbox
    roots, volumes, sandboxes.json) is under ``tmp_path / "local-modal"``.
    """
    with LocalModal(state_dir=tmp_path / "local-modal") as lm:
        yield lm


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prefect's own test harness: a temporary API server and database for the session,
    one for every folder that asks for it (two harnesses alive at once would leave
    Prefect's settings pointing at whichever started last)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())
