"""Pipeline mode: the whole flow run in one Modal Sandbox, started by a `modal` worker.

Deploy it to a work pool of type `modal` (see deployments/prefect.yaml):

    prefect work-pool create my-modal-pool --type modal
    prefect deploy --prefect-file deployments/prefect.yaml --name etl-local
    prefect worker start --pool my-modal-pool
    prefect deployment run 'etl/etl-local'

`python flows/pipeline.py` runs it here, in this process, as any flow.
Its tasks run with Prefect's default runner, inside the flow's sandbox.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "PREFECT_API_URL" not in os.environ:
    # Run as a script with no Prefect server: Prefect starts a temporary one, and
    # on a first run it creates and migrates a new database, which on a slow or
    # busy machine takes longer than Prefect's 20 s startup timeout. Only for
    # this script, and only unless you set it yourself.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import platform

from prefect import flow, task


@task
def extract(n: int) -> list[int]:
    return list(range(n))


@task
def transform(rows: list[int]) -> list[int]:
    return [r * r for r in rows]


@task
def load(rows: list[int]) -> int:
    total = sum(rows)
    print(f"loaded {len(rows)} rows, total {total}")
    return total


@flow(log_prints=True)
def etl(n: int = 10) -> int:
    print(f"etl running on {platform.node()} (python {platform.python_version()})")
    return load(transform(extract(n)))


if __name__ == "__main__":
    print(etl())
