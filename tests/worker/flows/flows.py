"""Flows the worker tests deploy; the sandbox reaches them through a pull step."""

from __future__ import annotations

import hashlib
import os
import time

from prefect import flow, get_run_logger, task


@flow
def hello(who: str = "world") -> str:
    print(f"SANDBOX-PRINT hello {who}", flush=True)
    get_run_logger().info("LOGGER-LINE hello %s", who)
    return f"hello {who}"


@flow
def boom() -> None:
    print("BOOM-PRINT about to raise", flush=True)
    raise ValueError("BOOM-MARKER")


@flow
def sleepy(seconds: float = 60) -> float:
    print("SLEEPY-START", flush=True)
    time.sleep(seconds)
    print("SLEEPY-END", flush=True)
    return seconds


def _sha(name: str) -> str:
    return hashlib.sha256(os.environ.get(name, "").encode()).hexdigest()


@flow
def secrets_probe(token_sha: str, key_sha: str) -> str:
    """Says whether the secrets arrived, without ever printing them."""
    token_ok = _sha("MY_SERVICE_TOKEN") == token_sha
    key_ok = _sha("PREFECT_API_KEY") == key_sha
    plain = os.environ.get("PLAIN_SETTING")
    print(f"SECRETS-PROBE token_ok={token_ok} key_ok={key_ok} plain={plain}")
    if not (token_ok and key_ok):
        raise RuntimeError("a secret did not reach the sandbox")
    return "ok"


@task
def double(x: int) -> int:
    print(f"TASK-PRINT double {x} in sandbox {os.environ.get('MODAL_SANDBOX_ID')}")
    return 2 * x


@flow
def fan_out(n: int = 2) -> list[int]:
    futures = [double.submit(i) for i in range(n)]
    return [f.result() for f in futures]


@flow
def lingering() -> str:
    """Returns at once, but a non-daemon thread keeps its process (and sandbox) alive."""
    import threading

    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    return "done"
