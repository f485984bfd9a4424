"""Workspace limits of the local server: creation throttle, running and GPU caps, output window.

The local server is one Modal workspace. Modal throttles sandbox creation
("Sandbox creation rate limit exceeded", answered as gRPC RESOURCE_EXHAUSTED,
which modal 1.6.4 raises as `modal.exception.ResourceExhaustedError` and does
not retry unless the server attaches a retry policy: see
``modal/sandbox/_task_command_router_client.py``), caps running sandboxes and
GPUs per workspace, and serves output from a window. Modal publishes none of
these numbers for sandboxes, so each one here is a setting, and every one but
the output window is off by default (a guessed limit would fail flows that
work on Modal). See docs/modal-rules.md.

Settings (each also a ``LocalModal`` argument and a ``prefect-modal local serve`` option):

* ``PREFECT_MODAL_LOCAL_CREATE_RATE``: sandbox creates per second (a token bucket
  holding one second's worth, at least one); unset or 0: no throttle;
* ``PREFECT_MODAL_LOCAL_MAX_SANDBOXES``: running sandboxes at once; unset or 0: no cap;
* ``PREFECT_MODAL_LOCAL_MAX_GPUS``: GPUs held by running sandboxes; unset or 0: no cap;
* ``PREFECT_MODAL_LOCAL_OUTPUT_WINDOW``: bytes of a stdout/stderr stream a reader
  can still get (`DEFAULT_OUTPUT_WINDOW`; an assumption, see there); 0: unbounded;
* ``PREFECT_MODAL_LOCAL_PIDS_LIMIT``: processes and threads one sandbox may have
  at once (`runtime.cgroups.DEFAULT_PIDS_LIMIT`; an assumption, see there); 0: none;
* ``PREFECT_MODAL_LOCAL_CGROUP_ROOT``: where the cgroup file systems that enforce
  a sandbox's memory, cpu and pids limits are mounted (default ``/sys/fs/cgroup``;
  a directory without any turns limits off, and the server says so);
* ``PREFECT_MODAL_LOCAL_STRICT_REQUESTS``: ``1`` (default): a sandbox's cpu or memory
  request without a limit is its limit here; ``0``: Modal's looser rule (no memory
  limit, cpu up to the request plus 4 cores): `runtime.cgroups.SandboxLimits.of`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from .runtime import cgroups

CREATE_RATE_ENV = "PREFECT_MODAL_LOCAL_CREATE_RATE"
MAX_SANDBOXES_ENV = "PREFECT_MODAL_LOCAL_MAX_SANDBOXES"
MAX_GPUS_ENV = "PREFECT_MODAL_LOCAL_MAX_GPUS"
OUTPUT_WINDOW_ENV = "PREFECT_MODAL_LOCAL_OUTPUT_WINDOW"
PIDS_LIMIT_ENV = "PREFECT_MODAL_LOCAL_PIDS_LIMIT"
CGROUP_ROOT_ENV = "PREFECT_MODAL_LOCAL_CGROUP_ROOT"
STRICT_REQUESTS_ENV = "PREFECT_MODAL_LOCAL_STRICT_REQUESTS"
DEFAULT_PIDS_LIMIT = cgroups.DEFAULT_PIDS_LIMIT

#: Bytes of each output stream kept readable. Modal publishes no size for its
#: window (modal/io_streams.py only warns that it "dropped first N bytes"); this
#: is an assumption, chosen to be conservative: 64 MiB is below what Modal's
#: retention could plausibly be and large enough that ordinary logs never meet
#: it, while a result sent whole on stdout (85 MiB of base64 for 64 MiB) does.
DEFAULT_OUTPUT_WINDOW = 64 * 1024 * 1024


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name}={raw!r}: expected a number >= 0")
    return value or None


@dataclass
class Limits:
    """What one local workspace may do; ``None`` is no limit."""

    create_rate: float | None = None
    max_sandboxes: int | None = None
    max_gpus: int | None = None
    output_window: int | None = DEFAULT_OUTPUT_WINDOW
    #: processes and threads per sandbox (``pids.max``), where cgroups are usable
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    #: where the cgroup file systems are mounted (`runtime.cgroups`)
    cgroup_root: str = cgroups.DEFAULT_ROOT
    #: a cpu or memory request without a limit is the limit (`runtime.cgroups`)
    strict_requests: bool = True
    _tokens: float = field(default=0.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> Limits:
        """The settings from the environment (for servers started on demand)."""
        window = _env_number(OUTPUT_WINDOW_ENV)
        raw_window = os.environ.get(OUTPUT_WINDOW_ENV, "").strip()
        pids = _env_number(PIDS_LIMIT_ENV)
        raw_pids = os.environ.get(PIDS_LIMIT_ENV, "").strip()
        return cls(
            pids_limit=DEFAULT_PIDS_LIMIT if not raw_pids else _int(pids),
            cgroup_root=os.environ.get(CGROUP_ROOT_ENV, "").strip() or cgroups.DEFAULT_ROOT,
            strict_requests=os.environ.get(STRICT_REQUESTS_ENV, "1").strip().lower()
            not in ("0", "false", "no", "off"),
            create_rate=_env_number(CREATE_RATE_ENV),
            max_sandboxes=_int(_env_number(MAX_SANDBOXES_ENV)),
            max_gpus=_int(_env_number(MAX_GPUS_ENV)),
            output_window=(
                DEFAULT_OUTPUT_WINDOW if not raw_window else (int(window) if window else None)
            ),
        )

    def take_create(self) -> bool:
        """One token of the creation bucket; False when creation is throttled now."""
        if not self.create_rate:
            return True
        burst = max(1.0, self.create_rate)
        now = time.monotonic()
        if self._last is None:
            self._tokens = burst
        else:
            self._tokens = min(burst, self._tokens + (now - self._last) * self.create_rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _int(value: float | None) -> int | None:
    return int(value) if value else None


def gpu_count(gpu: str | None) -> int:
    """How many GPUs a ``gpu`` string ("T4", "A100:2", "H100!") holds."""
    if not gpu:
        return 0
    _kind, _sep, count = gpu.partition(":")
    try:
        return max(1, int(count)) if count else 1
    except ValueError:
        return 1
