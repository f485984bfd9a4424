"""Fixtures for the local server tests: the back end (V1/V2) and an app."""

from __future__ import annotations

import uuid
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.ids import is_v1_sandbox_id


@pytest.fixture(params=["v2", "v1"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test against both sandbox back ends; MODAL_SANDBOX_V2=0 forces V1 in-process."""
    if request.param == "v1":
        monkeypatch.setenv("MODAL_SANDBOX_V2", "0")
    return str(request.param)


@pytest.fixture
def app(local_modal: LocalModal) -> Any:
    return modal.App.lookup(
        f"t-{uuid.uuid4().hex[:10]}", create_if_missing=True, client=local_modal.client
    )


def assert_backend(sandbox_id: str, backend: str) -> None:
    """The server minted an id of the shape that routes the client to ``backend``."""
    assert is_v1_sandbox_id(sandbox_id) == (backend == "v1"), sandbox_id
