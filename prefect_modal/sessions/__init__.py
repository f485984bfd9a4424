"""Sandbox sessions: live Modal Sandboxes that a task (or a flow) drives step by step.

Open one with `SandboxSession.create` (or `restore` from a `SandboxSnapshot`,
or `attach` by id), run commands in it, move files in and out, snapshot it.
What makes it Prefect-native rather than a thin wrapper of `modal.Sandbox`:

* each command's output is streamed live into the logs of the run that runs
  it (stdout at INFO, stderr at WARNING, secret env values redacted);
* each session is an artifact on its run (id, app, spec, image, status, the
  commands it ran, the snapshots it took, how to look at it) and emits the
  sandbox lifecycle events of `events.py`; `prefect-modal status` lists it;
* it ends with its ``with`` block, else with its task run (``keep=False``) or
  with its flow run (``keep=True``), whichever owns it; its lifetime
  (``spec.timeout``) is the backstop for a process that died;
* a snapshot is a small pydantic model, so it can be a task's result and be
  persisted by Prefect like any other;
* `ModalSandboxConfig` saves a sandbox configuration as a Prefect block.

A package of one-job modules: `session` (the handle), `results` (what it
hands back), `process` (a running command), `records` (its artifact),
`lifecycle` (ending with its owning runs), `context` (the run around it and
the Modal it reaches), `checks` (input checks), `errors`, `config` (the block).
This module re-exports the public names.
"""

from __future__ import annotations

# The constants and helpers other modules and tests read as `prefect_modal.sessions.X`.
from prefect_modal.sessions.config import ModalSandboxConfig
from prefect_modal.sessions.errors import (
    SessionEndedError,
    SessionError,
    SessionUnavailableError,
)
from prefect_modal.sessions.lifecycle import SESSIONS_FAMILY as SESSIONS_FAMILY
from prefect_modal.sessions.lifecycle import WATCH_INTERVAL_SECONDS as WATCH_INTERVAL_SECONDS
from prefect_modal.sessions.lifecycle import sessions_of_this_process as sessions_of_this_process
from prefect_modal.sessions.process import SandboxProcess
from prefect_modal.sessions.records import COMMAND_CHARS as COMMAND_CHARS
from prefect_modal.sessions.records import COMMANDS_KEPT as COMMANDS_KEPT
from prefect_modal.sessions.records import SESSION_KEY_PREFIX as SESSION_KEY_PREFIX
from prefect_modal.sessions.records import SessionRecord
from prefect_modal.sessions.results import ExecResult, OutputLine, SandboxFile, SandboxSnapshot
from prefect_modal.sessions.session import KEEP_TAG as KEEP_TAG
from prefect_modal.sessions.session import SandboxSession
from prefect_modal.sessions.session import SessionStatus as SessionStatus

__all__ = [
    "ExecResult",
    "ModalSandboxConfig",
    "OutputLine",
    "SandboxFile",
    "SandboxProcess",
    "SandboxSession",
    "SandboxSnapshot",
    "SessionEndedError",
    "SessionError",
    "SessionRecord",
    "SessionUnavailableError",
]
