"""Bad job variables fail before any sandbox; secrets never reach plain env, logs or artifacts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from worker_helpers import (
    API_KEY,
    MAIN_POOL,
    ModalServer,
    deploy,
    flow_run_logs,
    start_run,
    wait_final,
    wait_for,
)

from prefect_modal.core.artifacts import read_sandbox_artifacts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("job_variables", "expected"),
    [
        ({"memory": "lots"}, ["memory", "'lots'", "GiB"]),
        ({"gpu": "Z100"}, ["gpu", "Z100", "A100"]),
        (
            {"task_specs": {"train": {"image": "my/img:1"}}},
            ["task_specs['train'].image", "per_step"],
        ),
    ],
    ids=["memory", "gpu", "pipeline-per-task-image"],
)
def test_bad_job_variable_fails_submission_without_sandbox(
    api: Any,
    main_worker: Any,
    modal_server: ModalServer,
    job_variables: dict[str, Any],
    expected: list[str],
) -> None:
    dep = deploy(
        api,
        MAIN_POOL,
        "flows.py:hello",
        f"bad-{'-'.join(job_variables)}",
        job_variables=job_variables,
    )
    run_id = start_run(api, dep)
    run = wait_final(api, run_id, timeout=60)
    assert run.state.is_crashed(), run.state
    for text in expected:
        assert text in run.state.message, (text, run.state.message)
    assert modal_server.for_run(run_id) == []
    assert not any(r.name and str(run_id) in r.name for r in modal_server.sandboxes())


def test_secrets_travel_as_modal_secret_only(
    api: Any, main_worker: Any, modal_server: ModalServer
) -> None:
    token = "tok-secret-value-456789"
    dep = deploy(
        api,
        MAIN_POOL,
        "flows.py:secrets_probe",
        "secrets",
        job_variables={"env": {"MY_SERVICE_TOKEN": token, "PLAIN_SETTING": "visible"}},
    )
    run_id = start_run(
        api,
        dep,
        # The flow compares digests, so not even the parameters hold the values.
        token_sha=hashlib.sha256(token.encode()).hexdigest(),
        key_sha=hashlib.sha256(API_KEY.encode()).hexdigest(),
    )
    run = wait_final(api, run_id)
    assert run.state.is_completed(), run.state  # both secrets arrived in the sandbox

    # modal 1.6.4 (V2 sandboxes) sends `env=` and `Secret.from_dict` alike, as inline
    # secret sources, so the server's listing cannot tell them apart: the split is
    # asserted where we make it (test_job_configuration.py) and here, by the values
    # arriving while no listing, log or artifact shows them.
    [record] = modal_server.for_run(run_id)
    assert {"PLAIN_SETTING", "PREFECT_API_URL", "PREFECT_API_KEY"} <= set(record.env_names)

    artifacts = read_sandbox_artifacts(run_id)
    assert artifacts
    wait_for(
        lambda: any("SECRETS-PROBE token_ok=True" in m for m in flow_run_logs(api, run_id)),
        30,
        "the probe's line in the run's logs",
    )
    logs = "\n".join(flow_run_logs(api, run_id))
    assert "SECRETS-PROBE token_ok=True key_ok=True plain=visible" in logs
    listing = (modal_server.state_dir / "sandboxes.json").read_text()
    for secret in (token, API_KEY):
        assert secret not in logs
        assert secret not in listing
        assert secret not in main_worker.log()
        assert all(secret not in a.model_dump_json() for a in artifacts)
