"""Per-step mode in three tasks: each task call runs in its own Modal Sandbox.

    python flows/hello.py

Without Modal credentials the sandboxes are processes of the local Modal
server (a one-line notice says so); with `modal token new` done, they run on
Modal, unchanged.
"""

from __future__ import annotations

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
