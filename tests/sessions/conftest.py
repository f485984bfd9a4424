"""Fixtures of the session tests: one Prefect API (Prefect's test harness) and one local
Modal server per session, and a check after every test that no session still runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from session_support import running_sessions

from prefect_modal import ModalCredentials
from prefect_modal.local import LocalModal


@pytest.fixture(scope="session")
def modal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModal]:
    with LocalModal(state_dir=tmp_path_factory.mktemp("sessions-local-modal")) as lm:
        yield lm


@pytest.fixture
def credentials(modal_server: LocalModal) -> ModalCredentials:
    return ModalCredentials(
        token_id=modal_server.env["MODAL_TOKEN_ID"],
        token_secret=modal_server.env["MODAL_TOKEN_SECRET"],
        server_url=modal_server.url,
    )


@pytest.fixture(autouse=True)
def _no_session_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no session sandbox runs on the server (asked of the server)."""
    yield
    if "modal_server" not in request.fixturenames:
        return
    from waiting import wait_for

    server: LocalModal = request.getfixturevalue("modal_server")
    # A session that ends with its task or flow run ends within the watcher's interval.
    wait_for(lambda: not running_sessions(server), timeout=15, what="every session to end")
