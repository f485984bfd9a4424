"""Polling until something is true: the one wait loop of the test suites.

Imported by the worker, task runner and CLI tests (the rootdir conftest puts
`tests/` on sys.path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.2,
) -> T:
    """Poll until `predicate()` is truthy; its value, or an AssertionError naming `what`.

    `predicate` is asked once more after the deadline, so a slow last poll still counts.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
