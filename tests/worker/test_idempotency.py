"""A second submission of the same flow run finds its sandbox instead of starting another.

Drives the worker's find-or-create against the local Modal server directly (no
Prefect server needed): the same code path `ModalWorker.run` takes.
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from worker_helpers import ModalServer

from prefect_modal.core import modal_api
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.core.targets import Target
from prefect_modal.worker.worker import ModalWorker, ModalWorkerJobConfiguration

pytestmark = pytest.mark.slow


def _prepared(run: FlowRun, **values: Any) -> ModalWorkerJobConfiguration:
    config = ModalWorkerJobConfiguration(command="sleep 60", app_name="idempotency", **values)
    config.prepare_for_flow_run(run)
    return config


def test_second_submission_finds_the_running_sandbox(modal_server: ModalServer) -> None:
    target = Target(kind="local", client=modal_server.client, server_url=modal_server.url)
    worker = ModalWorker(work_pool_name="unused")
    run = FlowRun(id=uuid4(), name="twice", flow_id=uuid4())
    config = _prepared(run)
    spec = config.sandbox_spec()
    first, created = worker._find_or_create(run, config, spec, target, {}, {})
    try:
        again, created_again = worker._find_or_create(run, config, spec, target, {}, {})
        assert created and not created_again
        assert modal_api.sandbox_id(again) == modal_api.sandbox_id(first)
        assert len(modal_server.for_run(run.id)) == 1

        # A sandbox of another run holding the name (names always carry the run id,
        # so only something outside the worker can cause this) is never taken for ours.
        other = FlowRun(id=uuid4(), name="other", flow_id=uuid4())
        clash = _prepared(other)
        clash.name = config.name
        with pytest.raises(RuntimeError, match="another flow run"):
            worker._find_or_create(
                other, clash, SandboxSpec(app_name="idempotency"), target, {}, {}
            )
        assert modal_server.for_run(other.id) == []
    finally:
        modal_api.terminate(first)
