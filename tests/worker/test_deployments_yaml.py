"""deployments/prefect.yaml: the no-Docker deployment deploys with `prefect deploy` and runs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from worker_helpers import MAIN_POOL, PREFECT, PrefectServer, start_run, wait_final

pytestmark = pytest.mark.slow

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


def test_yaml_declares_docker_and_no_docker_deployments() -> None:
    config = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in config["deployments"]}
    docker = by_name["hello-docker"]
    assert docker["build"][0].keys() == {"prefect_docker.deployments.steps.build_docker_image"}
    assert docker["push"][0].keys() == {"prefect_docker.deployments.steps.push_docker_image"}
    assert docker["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
    assert "build" not in by_name["hello-local"]
    assert by_name["squares-per-step"]["work_pool"]["job_variables"]["mode"] == "per_step"


def test_prefect_deploy_hello_local_runs_on_the_modal_pool(
    api: Any, main_worker: Any, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "-n", "hello-local", "--pool", MAIN_POOL],
        cwd=DEPLOYMENTS,
        env=prefect_server.env(tmp_path) | {"PWD": str(DEPLOYMENTS)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deployment = api.read_deployment_by_name("hello/hello-local")
    assert deployment.job_variables["memory"] == "1GiB"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(DEPLOYMENTS)}}
    ]
    run = wait_final(api, start_run(api, deployment.id), timeout=90)
    assert run.state.is_completed(), run.state
