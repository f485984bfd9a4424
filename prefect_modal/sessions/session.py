"""`SandboxSession`: a live Modal Sandbox that a task (or a flow) drives step by step.

The per-step runner ships one function call per sandbox; a session is the
other shape of work Modal sandboxes are made for: open one idle sandbox, run
commands in it (untrusted or generated code, test cases, evaluations), move
files in and out, snapshot its filesystem and start new sessions from the
snapshot, re-attach to it by id from another task.

This module is the handle itself: opening (create, restore, attach), commands,
files, snapshots and ending.  What it hands back is in `results.py`, its
artifact in `records.py`, a running command in `process.py`, how it ends with
its owning runs in `lifecycle.py`.  Nothing here imports `modal`: every Modal
call is in `modal_api.py`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextvars import copy_context
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from prefect_modal import events
from prefect_modal.core import modal_api, resources
from prefect_modal.core import tags as tag_keys
from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.sessions.checks import as_spec, check_command, check_path, check_timeout
from prefect_modal.sessions.context import RunInfo, current_run, run_logger
from prefect_modal.sessions.context import target as session_target
from prefect_modal.sessions.errors import SessionEndedError
from prefect_modal.sessions.lifecycle import live_sessions, register, watch
from prefect_modal.sessions.process import SandboxProcess
from prefect_modal.sessions.records import (
    COMMAND_CHARS,
    COMMANDS_KEPT,
    SessionRecord,
    artifact_queue,
)
from prefect_modal.sessions.results import (
    ExecResult,
    SandboxFile,
    SandboxSnapshot,
    spec_without_secrets,
)

if TYPE_CHECKING:
    from prefect_modal.core.targets import Target

#: Tag on a session's sandbox: "true" when it outlives its task.
KEEP_TAG = "prefect-modal.session-keep"

_EXIT_STATUS = {0: "succeeded", 137: "terminated", 124: "timeout"}

logger = logging.getLogger("prefect_modal.sessions")

SessionStatus = Literal["running", "succeeded", "failed", "terminated", "timeout", "gone"]


class SandboxSession:
    """A live Modal Sandbox driven from a task or flow: exec, files, snapshot, restore, attach.

    Example::

        from prefect import flow, task
        from prefect_modal import SandboxSession, SandboxSpec

        @task
        def evaluate(code: str) -> int:
            with SandboxSession.create(SandboxSpec(cpu=1, timeout=600)) as session:
                session.write_text("/work/main.py", code)
                return session.exec("python", "/work/main.py", timeout=60).returncode

    Open one with `create`, `restore` (from a `SandboxSnapshot`) or `attach` (by
    `session_id`, from another task).  Without Modal credentials it runs on the
    local Modal server, as the task runner does.
    """

    def __init__(
        self,
        *,
        sandbox: Any,
        target: Target,
        spec: SandboxSpec,
        keep: bool,
        block_network: bool,
        owned: bool,
        record: SessionRecord | None,
        run: RunInfo,
        origin: SandboxSession | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._target = target
        self.spec = spec
        self.keep = keep
        self.block_network = block_network
        self._owned = owned
        self._record = record
        self._run = run
        self._origin = origin
        self._secret_values = tuple(v for v in spec.secret_env().values() if v)
        self._ended = threading.Event()
        self._end_lock = threading.Lock()
        self._events: events.SandboxEvents | None = None
        self.owner: object = run.runner
        self._registry: Any = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        spec: SandboxSpec | None = None,
        *,
        credentials: ModalCredentials | None = None,
        keep: bool = False,
        block_network: bool = False,
    ) -> SandboxSession:
        """A session on a new idle sandbox with the spec's image, resources, secrets,
        env and volumes.

        ``keep=False``: it ends with its ``with`` block, else with the task run (or
        flow run, in the flow body) that opened it.  ``keep=True``: it outlives its
        task and ends with the flow run.  ``block_network=True`` gives the sandbox
        no network at all.  Bad input fails here, before any sandbox exists.
        """
        return cls._open(spec, credentials, keep, block_network, image_id=None, restored=None)

    @classmethod
    def restore(
        cls,
        snapshot: SandboxSnapshot,
        spec: SandboxSpec | None = None,
        *,
        credentials: ModalCredentials | None = None,
        keep: bool = False,
        block_network: bool | None = None,
    ) -> SandboxSession:
        """A new session whose filesystem starts as `snapshot` left it.

        `spec` is laid over the snapshot's spec field by field (resources, env,
        secret env values); the image is always the snapshot's.
        """
        if isinstance(snapshot, dict):
            snapshot = SandboxSnapshot.model_validate(snapshot)
        if not isinstance(snapshot, SandboxSnapshot):
            raise TypeError(
                f"restore(): snapshot must be a SandboxSnapshot (from session.snapshot()), "
                f"not {type(snapshot).__name__}."
            )
        merged = snapshot.spec.merged_with(as_spec(spec))
        network = snapshot.block_network if block_network is None else block_network
        return cls._open(
            merged, credentials, keep, network, image_id=snapshot.image_id, restored=snapshot
        )

    @classmethod
    def attach(
        cls, session_id: str, *, credentials: ModalCredentials | None = None
    ) -> SandboxSession:
        """The live session `session_id` (from another task or process).

        The handle runs commands and moves files like the original; the session
        still ends as its opener decided (its ``with`` block, task or flow run),
        or when `terminate()` is called on any handle.  Raises `SessionEndedError`
        when the sandbox has finished.
        """
        if not isinstance(session_id, str) or not session_id.startswith("sb-"):
            raise ValueError(
                f"attach(): session_id={session_id!r} is not a session id; use "
                "session.session_id, e.g. 'sb-...'."
            )
        origin = live_sessions.get(session_id)
        target = origin._target if origin is not None else session_target(credentials)
        try:
            sandbox = modal_api.from_id(session_id, target.client)
            code = modal_api.poll(sandbox)
        except modal_api.NotFoundError:
            raise SessionEndedError(
                f"attach(): session {session_id} does not exist on {target.kind} Modal "
                f"({target.server_url}); it ended and was cleaned up, or belongs to another "
                "Modal (pass credentials=)."
            ) from None
        if code is not None:
            raise SessionEndedError(
                f"attach(): session {session_id} has finished ({_describe_exit(code)}); "
                "only a running session can be attached. Start a new one with "
                "SandboxSession.create(), or SandboxSession.restore(snapshot) to go on from "
                "a snapshot."
            )
        spec = origin.spec if origin is not None else SandboxSpec()
        session = cls(
            sandbox=sandbox,
            target=target,
            spec=spec,
            keep=origin.keep if origin is not None else False,
            block_network=origin.block_network if origin is not None else False,
            owned=False,
            record=None,
            run=current_run(),
            origin=origin,
        )
        run_logger().info("Attached to sandbox session %s", session_id)
        return session

    @classmethod
    def _open(
        cls,
        spec: SandboxSpec | None,
        credentials: ModalCredentials | None,
        keep: bool,
        block_network: bool,
        image_id: str | None,
        restored: SandboxSnapshot | None,
    ) -> SandboxSession:
        spec = as_spec(spec) or SandboxSpec()
        if credentials is not None and not isinstance(credentials, ModalCredentials):
            raise TypeError(
                f"credentials must be a ModalCredentials block, not {type(credentials).__name__}."
            )
        for name, value in (("keep", keep), ("block_network", block_network)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True or False.")
        run = current_run()
        target = session_target(credentials)
        tags = {tag_keys.MODE: "session", KEEP_TAG: "true" if keep else "false"}
        if run.flow_run_id:
            tags[tag_keys.FLOW_RUN] = str(run.flow_run_id)
        if run.task_run_id:
            tags[tag_keys.TASK_RUN] = str(run.task_run_id)
        if run.task_name:
            tags[tag_keys.TASK_NAME] = run.task_name
        sandbox = modal_api.create_session_sandbox(
            spec, client=target.client, tags=tags, image_id=image_id, block_network=block_network
        )
        sandbox_id = modal_api.sandbox_id(sandbox)
        described = spec.describe()
        record = SessionRecord(
            sandbox_id=sandbox_id,
            app_name=spec.effective_app_name,
            target=target.kind,
            flow_run_id=run.flow_run_id,
            task_run_id=run.task_run_id,
            task_name=run.task_name,
            mode="session",
            resources=described,
            status="running",
            link=modal_api.dashboard_url(sandbox_id, spec.effective_app_name, target.server_url),
            keep=keep,
            image=image_id or described.get("image"),
            restored_from=restored.source_session_id if restored else None,
        )
        session = cls(
            sandbox=sandbox,
            target=target,
            spec=spec,
            keep=keep,
            block_network=block_network,
            owned=True,
            record=record,
            run=run,
        )
        session._start()
        how = f"restored from snapshot {image_id}" if image_id else "created"
        run_logger().info(
            "Sandbox session %s %s (app %s on %s%s). See: %s",
            sandbox_id,
            how,
            spec.effective_app_name,
            target.kind,
            ", kept until the flow run ends" if keep else "",
            record.link,
        )
        return session

    def _start(self) -> None:
        record = self._record
        assert record is not None
        live_sessions[self.session_id] = self
        self._registry = register(self)
        if record.flow_run_id is not None:
            self._events = events.for_record(record)
            self._events.created()
            self._events.running()
            artifact_queue.write(record)
            watch(self)

    # -- facts -------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The sandbox id: what `attach` takes, what Modal and `prefect-modal` show."""
        return modal_api.sandbox_id(self._sandbox)

    @property
    def returncode(self) -> int | None:
        """None while the session runs; else its sandbox's exit code (137: terminated)."""
        try:
            return modal_api.poll(self._sandbox)
        except modal_api.NotFoundError:
            return None

    @property
    def status(self) -> SessionStatus:
        """Live, from Modal: running, succeeded, failed, terminated, timeout or gone."""
        try:
            code = modal_api.poll(self._sandbox)
        except modal_api.NotFoundError:
            return "gone"
        if code is None:
            return "running"
        return _EXIT_STATUS.get(code, "failed")  # type: ignore[return-value]

    @property
    def record(self) -> SessionRecord | None:
        """What the session's artifact says (None for an attached handle in another process)."""
        source = self._origin or self
        return source._record.model_copy(deep=True) if source._record else None

    def __repr__(self) -> str:
        return (
            f"SandboxSession(session_id={self.session_id!r}, target={self._target.kind!r}, "
            f"keep={self.keep})"
        )

    # -- commands ----------------------------------------------------------------------------

    def exec(
        self,
        *command: str,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to its end; its output streams into the run's logs as it comes.

        A command is an argument list, as with `subprocess.run` (no shell): use
        ``exec("sh", "-c", "...")`` for a shell line.  A non-zero exit code is
        returned, not raised (`ExecResult.check_returncode()` raises it).
        `timeout` ends the command after that many seconds.
        """
        return self._spawn(command, workdir, env, timeout, streaming=False).wait()

    def exec_stream(
        self,
        *command: str,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> SandboxProcess:
        """Start a command and return at once: iterate the handle for its
        `OutputLine`s as they arrive, then `wait()` for its `ExecResult`."""
        return self._spawn(command, workdir, env, timeout, streaming=True)

    def _spawn(
        self,
        command: Sequence[str],
        workdir: str | None,
        env: dict[str, str] | None,
        timeout: float | None,
        streaming: bool,
    ) -> SandboxProcess:
        cmd = check_command(command)
        seconds = check_timeout(timeout)
        workdir = resources.check_absolute_path(workdir, field="workdir")
        if env is not None:
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()
            ):
                raise TypeError("exec(): env must map variable names to string values.")
        self._check_running("exec")
        process = modal_api.exec_process(
            self._sandbox, cmd, workdir=workdir, env=env, timeout=seconds
        )
        return SandboxProcess(self, cmd, process, run_logger(), seconds, streaming)

    # -- files ----------------------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to the sandbox's absolute `path` (parent directories are made)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"write_bytes(): data must be bytes, not {type(data).__name__}.")
        modal_api.fs_write_bytes(self._sandbox, check_path(path, "write_bytes"), bytes(data))

    def write_text(self, path: str, text: str, encoding: str = "utf-8") -> None:
        """Write `text` to the sandbox's absolute `path` (parent directories are made)."""
        if not isinstance(text, str):
            raise TypeError(f"write_text(): text must be str, not {type(text).__name__}.")
        self.write_bytes(check_path(path, "write_text"), text.encode(encoding))

    def read_bytes(self, path: str) -> bytes:
        """The bytes of the sandbox's file `path`; FileNotFoundError if it has none."""
        return modal_api.fs_read_bytes(self._sandbox, check_path(path, "read_bytes"))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(check_path(path, "read_text")).decode(encoding)

    def list_files(self, path: str = "/") -> list[SandboxFile]:
        """The entries of the sandbox's directory `path`, sorted by name."""
        entries = modal_api.fs_list(self._sandbox, check_path(path, "list_files"))
        return sorted((SandboxFile(**e) for e in entries), key=lambda f: f.name)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove the sandbox's file `path` (a directory needs ``recursive=True``)."""
        modal_api.fs_remove(self._sandbox, check_path(path, "remove"), recursive=recursive)

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot(self) -> SandboxSnapshot:
        """Snapshot the session's filesystem (volumes excluded), for `restore`."""
        self._check_running("snapshot")
        image_id = modal_api.snapshot_filesystem(self._sandbox)
        snap = SandboxSnapshot(
            image_id=image_id,
            source_session_id=self.session_id,
            spec=spec_without_secrets(self.spec),
            secret_env_names=sorted(self.spec.secret_env()),
            block_network=self.block_network,
            target=self._target.kind,
        )
        source = self._origin or self
        if source._record is not None:
            source._record.snapshots.append(image_id)
            artifact_queue.write(source._record)
        run_logger().info("Snapshot %s taken of sandbox session %s", image_id, self.session_id)
        return snap

    # -- ending ---------------------------------------------------------------------------------

    def terminate(self) -> None:
        """End the session now (any handle may); a no-op once it has ended."""
        if self._origin is not None:
            self._origin._end("terminated by an attached handle")
            return
        if not self._owned:
            modal_api.terminate(self._sandbox)
            return
        self._end("terminated")

    def cancel(self, reason: str) -> threading.Thread | None:
        """End the session in a background thread (what a registry's cancel_all calls)."""
        if self._ended.is_set():
            return None
        thread = threading.Thread(target=copy_context().run, args=(self._end, reason), daemon=True)
        thread.start()
        return thread

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owned:
            self._end("its `with` block ended")
        else:
            modal_api.detach(self._sandbox)

    def _end(self, why: str) -> None:
        """Terminate (if it still runs), write the final record, emit the events."""
        with self._end_lock:
            if self._ended.is_set():
                return
            try:
                code = modal_api.poll(self._sandbox)
            except modal_api.NotFoundError:
                code = None
            terminated = False
            if code is None:
                modal_api.terminate(self._sandbox)
                terminated = True
                code = 137
            self._ended.set()
        live_sessions.pop(self.session_id, None)
        if self._registry is not None:
            self._registry.discard(self)
        record = self._record
        if record is None:
            return
        record.status = _EXIT_STATUS.get(code, "failed")  # type: ignore[assignment]
        record.exit_code = code
        record.ended_at = datetime.now(timezone.utc)
        if self._events is not None:
            reason = events.exit_reason(record.status, code)
            self._events.exited(code, reason, seconds=record.seconds)
            if terminated:
                self._events.terminated(why)
        if record.flow_run_id is not None:
            artifact_queue.write(record)
            artifact_queue.flush()
        logger.debug("Sandbox session %s ended: %s", record.sandbox_id, why)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- internals ------------------------------------------------------------------------------

    def _check_running(self, what: str) -> None:
        if (self._origin or self)._ended.is_set():
            raise SessionEndedError(
                f"{what}(): session {self.session_id} has ended; open a new one "
                "(SandboxSession.create, or restore from a snapshot)."
            )

    def _redact(self, text: str) -> str:
        for value in self._secret_values:
            text = text.replace(value, "***")
        return text

    def _note_command(self, result: ExecResult) -> None:
        source = self._origin or self
        if source._record is None:
            return
        shown = self._redact(" ".join(result.command))
        if len(shown) > COMMAND_CHARS:
            shown = shown[: COMMAND_CHARS - 1] + "…"
        source._record.commands = [
            *source._record.commands[-(COMMANDS_KEPT - 1) :],
            f"{shown}  -> exit {result.returncode} ({result.seconds:.1f}s)",
        ]
        if source._record.flow_run_id is not None:
            artifact_queue.write(source._record)


def _describe_exit(code: int) -> str:
    meaning = {137: "terminated", 124: "reached its timeout", 0: "its command ended"}
    return f"exit code {code}: {meaning.get(code, 'failed')}"
