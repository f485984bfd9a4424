"""`prefect-modal local serve` in a process of its own, as a user starts it, read to READY."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_serve(
    state: Path, *args: str, env: dict[str, str] | None = None, stderr: Any = subprocess.DEVNULL
) -> tuple[subprocess.Popen[str], dict[str, str], str]:
    """Start ``python -m prefect_modal.local serve --state-dir STATE ARGS`` and read its
    output up to the READY line: the process (the caller stops it by its pid), the
    variables it printed (``export K=V``) and the URL READY names."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_modal.local", "serve", "--state-dir", str(state), *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    exports: dict[str, str] = {}
    url = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                exports[key] = value
            if line.startswith("READY "):
                url = line.split()[1]
                break
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, exports, url
