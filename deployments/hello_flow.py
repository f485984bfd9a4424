"""Example flows for deployments/prefect.yaml (a `modal` work pool)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task


@task
def square(x: int) -> int:
    return x * x


@flow(log_prints=True)
def hello(name: str = "Modal") -> str:
    """Pipeline mode: this whole flow run runs in one Modal sandbox."""
    get_run_logger().info("Hello from a Modal sandbox, %s!", name)
    return f"hello {name}"


@flow(log_prints=True)
def squares(n: int = 4) -> list[int]:
    """per_step mode: each `square` call runs in its own Modal sandbox."""
    results = [f.result() for f in [square.submit(i) for i in range(n)]]
    print(f"squares: {results}")
    return results
