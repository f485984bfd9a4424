"""A flow run by `prefect flow-run execute` in the cancellation test (and a __main__ script)."""

from __future__ import annotations

import logging
import os
import sys
import time

from prefect import flow, task

from prefect_modal import ModalTaskRunner


@task
def sleepy(i: int) -> int:
    print(f"sleeper {i} started", flush=True)
    time.sleep(120)
    return i


@flow(task_runner=ModalTaskRunner(max_parallelism=8))
def cancel_me(n: int = 8) -> list[int]:
    return sleepy.map(range(n)).result()


@task
def quick(i: int) -> int:
    return i


@flow(task_runner=ModalTaskRunner(max_parallelism=8))
def cancel_warm(n: int = 4) -> list[int]:
    """Eight warm sandboxes, then `n` of them busy with sleepers and the rest idle."""
    quick.map(range(8)).result()
    return sleepy.map(range(n)).result()


@task
def defined_in_main(x: int) -> dict:
    """Defined in __main__ when this file runs as a script: travels by value."""
    return {"x": x * 2, "pid": os.getpid(), "sandbox": os.environ.get("MODAL_SANDBOX_ID")}


@flow(task_runner=ModalTaskRunner())
def main_flow() -> dict:
    return defined_in_main.submit(21).result()


if __name__ == "__main__":
    if sys.argv[1:] == ["sleepers"]:  # for the Ctrl-C test: runs until interrupted
        # the runner's debug lines, timed, for the test's failure report
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(created).3f %(threadName)s %(message)s"))
        logging.getLogger("prefect_modal").addHandler(handler)
        logging.getLogger("prefect_modal").setLevel(logging.DEBUG)
        cancel_me(4)
        sys.exit(0)
    out = main_flow()
    assert out["pid"] != os.getpid(), out
    print(f"RESULT {out['x']} {out['sandbox']}")
    sys.exit(0)
