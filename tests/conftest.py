"""Shared fixtures: an isolated HOME and the embedded local Modal server.

The modal client reads ``~/.modal.toml`` (or ``MODAL_CONFIG_PATH``) and
``MODAL_*`` variables; tests must never see a developer's real profile or
token, so every test gets its own HOME and a scrubbed ``MODAL_*`` environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_modal.local import LocalModal


@pytest.fixture(autouse=True)
def _isolated_modal_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(home / ".modal.toml"))
    for key in list(os.environ):
        if key.startswith("MODAL_") and key != "MODAL_CONFIG_PATH":
            monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def local_modal_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModal]:
    """One server for the whole session (cheap tests share it)."""
    state = tmp_path_factory.mktemp("local-modal-session")
    with LocalModal(state_dir=state, secrets={"test-secret": {"TEST_SECRET_VALUE": "s3cr3t-session"}}) as lm:
        yield lm


@pytest.fixture
def local_modal(tmp_path: Path) -> Iterator[LocalModal]:
    """A fresh local Modal server for one test, stopped (no process left) afterwards.

    ``local_modal.client`` is a modal.Client for it; ``local_modal.env`` is what
    a child process needs (MODAL_SERVER_URL + token pair).
    """
    with LocalModal(state_dir=tmp_path / "local-modal") as lm:
        yield lm
