"""Servers for the CLI tests: a real Prefect server and the local Modal server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_servers import LiveServers, live_servers


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServers]:
    with live_servers(tmp_path_factory.mktemp("cli-servers")) as started:
        yield started
