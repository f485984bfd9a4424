"""Helpers of the ModalTaskRunner tests (a module of its own: `from conftest import`
finds whichever conftest.py was imported first when several test folders run)."""

from __future__ import annotations

from functools import partial
from typing import Any

from waiting import wait_for

from prefect_modal.local import LocalModal, SandboxRecord


def sandboxes_of(server: LocalModal, flow_run_id: Any) -> list[SandboxRecord]:
    """Every sandbox the server ran for one flow run (found by our tag, as status.py does)."""
    return [s for s in server.sandboxes() if s.tags.get("prefect.flow-run-id") == str(flow_run_id)]


#: `waiting.wait_for`, polling every 0.05 s (sandbox listings change fast).
wait_until = partial(wait_for, interval=0.05)
