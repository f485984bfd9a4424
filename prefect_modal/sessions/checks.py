"""The checks of what a caller passes to a session (paths, commands, timeouts, specs).

Bad input fails here with a message naming the argument, the value and what is
accepted, before any call reaches the sandbox; kept apart so the session's
methods read as what they do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prefect_modal.core.spec import SandboxSpec


def check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(
            f"{what}: path={path!r} must be an absolute path inside the sandbox, "
            "e.g. '/workspace/data.txt'."
        )
    return path


def check_command(command: Sequence[Any]) -> tuple[str, ...]:
    if not command:
        raise ValueError(
            "exec() needs a command, e.g. session.exec('python', '-c', 'print(1)'), "
            "or session.exec('sh', '-c', 'ls | wc -l') for a shell line."
        )
    bad = [c for c in command if not isinstance(c, str)]
    if bad:
        raise TypeError(
            f"exec(): every part of the command must be a string; got {bad[0]!r} "
            f"({type(bad[0]).__name__}). Pass str(value)."
        )
    return tuple(command)


def check_timeout(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"exec(): timeout={timeout!r} must be a number of seconds above 0.")
    return max(1, math.ceil(timeout))


def as_spec(spec: Any) -> SandboxSpec | None:
    if spec is None or isinstance(spec, SandboxSpec):
        return spec
    if isinstance(spec, dict):
        return SandboxSpec(**spec)
    raise TypeError(f"spec must be a SandboxSpec, not {type(spec).__name__}.")
