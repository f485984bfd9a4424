"""A per-step flow with a runner of its own: it imports prefect_modal at load time,
so it lives apart from `flows.py`, whose pipeline-mode flows run in an image that
has prefect alone (as the worker's default image on Modal does)."""

from __future__ import annotations

import os

from prefect import flow, task

from prefect_modal import ModalTaskRunner, SandboxSpec


@task
def show_env() -> str:
    seen = " ".join(f"{k}={os.environ.get(k)}" for k in ("POOL_VAR", "FLOW_VAR", "SHARED"))
    print(f"LAYERED-ENV {seen}", flush=True)
    return seen


@flow(
    task_runner=ModalTaskRunner(
        spec=SandboxSpec(cpu=0.5, env={"FLOW_VAR": "from-flow", "SHARED": "from-flow"}),
        max_parallelism=3,
    )
)
def layered() -> str:
    return show_env.submit().result()
