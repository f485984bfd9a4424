"""A flow run by `prefect flow-run execute` in the cancellation test: three live sessions."""

from __future__ import annotations

import time

from prefect import flow, task

from prefect_modal import SandboxSession


@task
def open_kept(i: int) -> str:
    session = SandboxSession.create(keep=True)
    session.exec("sh", "-c", f"echo session {i} up")
    return session.session_id


@flow
def three_sessions() -> None:
    ids = [f.result() for f in open_kept.map(range(3))]
    print("sessions open:", ids, flush=True)
    time.sleep(300)
