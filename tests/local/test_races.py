"""Races between a sandbox's start and its end, which once raised in the server.

Both were ``AttributeError``s in the server's log: `LocalSandbox._watch_container`
read ``returncode`` of a pasta process that `_stop_pasta` had just cleared, and
`_attach_network` did the same when a sandbox with ports was terminated while
pasta was still starting. The server now logs any error of a sandbox's
background work at once (not when the task is garbage-collected), so a test
can see that none happened.
"""

from __future__ import annotations

import logging
from typing import Any

import modal
import pytest
from waiting import wait_for

from prefect_modal.local import LocalModal

from .test_isolation import _pasta_children

pytestmark = pytest.mark.timeout(120)


def background_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "prefect_modal.local" and r.levelno >= logging.ERROR
    ]


def test_terminate_while_pasta_starts(
    local_modal: LocalModal, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A sandbox with ports terminated at once, many times: pasta is starting or
    configuring the namespace when the end comes; the server raises nothing,
    and no pasta outlives its sandbox."""
    if local_modal.isolation is None or not local_modal.isolation.pasta:
        pytest.fail("this test needs an isolating server with pasta (passt)")
    caplog.set_level(logging.DEBUG, logger="prefect_modal.local")
    pool = local_modal.isolation.netns  # namespaces made ahead: their pasta is no sandbox's

    def held() -> set[int]:
        return pool.pids() if pool is not None else set()

    before = _pasta_children() - held()
    sandboxes = []
    for _ in range(12):
        sb = modal.Sandbox.create(
            "sleep", "100", app=app, client=local_modal.client, encrypted_ports=[8000]
        )
        sb.terminate()
        sandboxes.append(sb)
    for sb in sandboxes:
        assert sb.wait(raise_on_termination=False) is None
        assert sb.returncode == 137
    # let the background work of every sandbox end, then look at what it said
    local_modal._call(lambda: None)
    records = {r.id: r for r in local_modal.sandboxes()}
    assert all(records[sb.object_id].status == "terminated" for sb in sandboxes)
    assert background_errors(caplog) == []
    wait_for(lambda: not (_pasta_children() - held() - before), 10, "no pasta outlives its sandbox")
