"""Per-step mode in three tasks: each task call runs in its own Modal Sandbox.

    python flows/hello.py

Without Modal credentials the sandboxes are processes of the local Modal
server (a one-line notice says so); with `modal token new` done, they run on
Modal, unchanged.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "PREFECT_API_URL" not in os.environ:
    # Run as a script with no Prefect server: Prefect starts a temporary one, and
    # on a first run it creates and migrates a new database, which on a slow or
    # busy machine takes longer than Prefect's 20 s startup timeout. Only for
    # this script, and only unless you set it yourself.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task

from prefect_modal import ModalTaskRunner, SandboxSpec


@task
def greet(name: str) -> str:
    print(f"hello {name}, from inside a sandbox")
    return f"hello {name}"


@task
def shout(text: str) -> str:
    return text.upper() + "!"


@task
def combine(parts: list[str]) -> str:
    return " | ".join(parts)


@flow(task_runner=ModalTaskRunner(spec=SandboxSpec(cpu=0.25, memory="256MiB")), log_prints=True)
def hello(names: list[str] | None = None) -> str:
    greetings = greet.map(names or ["Ada", "Grace", "Linus"])
    loud = shout.map(greetings)
    return combine.submit(loud).result()


if __name__ == "__main__":
    print(hello())
