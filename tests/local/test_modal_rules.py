"""Modal's rules as the local server models them (docs/modal-rules.md), through the real client.

Each test names the rule it checks; the table in docs/modal-rules.md points here.
"""

from __future__ import annotations

from typing import Any

import modal
import modal.exception
import pytest

from prefect_modal.local import LocalModal

pytestmark = pytest.mark.timeout(90)


def _create(lm: LocalModal, app: Any, *args: str, **kw: Any) -> Any:
    return modal.Sandbox.create(*args, app=app, client=lm.client, **kw)


def test_an_exec_whose_timeout_fires_gives_minus_one(local_modal: LocalModal, app: Any) -> None:
    """modal/container_process.py, ContainerProcess.wait: the client's exec deadline
    gives returncode -1; the server must not answer with the kill's 137 first."""
    sb = _create(local_modal, app, "sleep", "60")
    p = sb.exec("sleep", "30", timeout=1)
    assert p.wait() == -1
    assert p.returncode == -1
    quick = sb.exec("sh", "-c", "exit 3", timeout=20)
    assert quick.wait() == 3  # one that ends in time keeps its own code
    sb.terminate()
