"""Fixtures for the ModalTaskRunner tests: one Prefect API and one local Modal server
per session, and runners pointed at that server.

Each test runs its own flow run, and every sandbox carries its flow run id as a
tag, so tests share the servers and still count only their own sandboxes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefect_modal import ModalCredentials, ModalTaskRunner
from prefect_modal.local import LocalModal


@pytest.fixture(scope="session")
def modal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModal]:
    with LocalModal(
        state_dir=tmp_path_factory.mktemp("runner-local-modal"),
        secrets={"runner-secret": {"NAMED_SECRET_VALUE": "n4med-s3cret"}},
    ) as lm:
        yield lm


@pytest.fixture
def credentials(modal_server: LocalModal) -> ModalCredentials:
    """A block pointing at the session's local server (so no auto-started server)."""
    token_id, token_secret = (
        modal_server.env["MODAL_TOKEN_ID"],
        modal_server.env["MODAL_TOKEN_SECRET"],
    )
    return ModalCredentials(
        token_id=token_id, token_secret=token_secret, server_url=modal_server.url
    )


@pytest.fixture
def make_runner(prefect_api: str, credentials: ModalCredentials) -> Callable[..., ModalTaskRunner]:
    def make(**kwargs: Any) -> ModalTaskRunner:
        kwargs.setdefault("credentials", credentials)
        return ModalTaskRunner(**kwargs)

    return make
