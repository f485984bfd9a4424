"""`prefect work-pool create P --type modal` works offline and shows every variable."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from worker_helpers import PREFECT, PrefectServer

from prefect_modal.core.spec import SandboxSpec
from prefect_modal.worker.worker import ModalWorker

pytestmark = pytest.mark.slow


def test_work_pool_create_type_modal_offline(
    api: Any, prefect_server: PrefectServer, tmp_path: Any
) -> None:
    env = prefect_server.env(tmp_path)
    started = time.monotonic()
    done = subprocess.run(
        [PREFECT, "work-pool", "create", "cli-pool", "--type", "modal"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 60  # no hanging on the collections registry

    pool = api.read_work_pool("cli-pool")
    assert pool.type == "modal"
    assert pool.base_job_template == json.loads(
        json.dumps(ModalWorker.get_default_base_job_template())
    )
    props = pool.base_job_template["variables"]["properties"]
    for name in [
        *SandboxSpec.model_fields,
        "mode",
        "max_parallelism",
        "stream_output",
        "name",
        "modal_credentials",
        "task_specs",
        "cancel_grace_seconds",
        "command",
    ]:
        assert props[name].get("description"), name

    shown = subprocess.run(
        [PREFECT, "work-pool", "get-default-base-job-template", "--type", "modal"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["variables"]["properties"]["mode"]["default"] == "pipeline"
