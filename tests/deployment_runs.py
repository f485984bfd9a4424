"""A flow run of a deployment made from an entrypoint file, for tests that run it in a
process of its own (`prefect flow-run execute`) to cancel or signal it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun


def run_of_entrypoint(flow_name: str, deployment: str, entrypoint: str, path: Path) -> FlowRun:
    """A new (scheduled) flow run of `entrypoint` ("file.py:flow"), found under `path`."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow_name)
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=deployment, entrypoint=entrypoint, path=str(path)
        )
        return client.create_flow_run_from_deployment(deployment_id)


def execute_in_a_process(run: FlowRun, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`prefect flow-run execute RUN` in a process of its own, its output in one pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "flow-run", "execute", str(run.id)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def failure_report(proc: subprocess.Popen[str], sandboxes: Iterable[Any]) -> str:
    """For a failure message: the flow run's sandboxes as the server lists them, and the
    flow process's exit code and last output (the process is killed first if it still runs:
    its pipe is read to the end here)."""
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate()[0] if proc.stdout and not proc.stdout.closed else ""
    listed = [f"  {s.id} {s.status} rc={s.returncode}" for s in sandboxes] or ["  (none)"]
    return "\n".join(
        [
            "the flow run's sandboxes:",
            *listed,
            f"the flow process (exit code {proc.returncode}), its last output:",
            output[-5000:],
        ]
    )
