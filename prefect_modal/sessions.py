"""`SandboxSession`: a live Modal Sandbox that a task (or a flow) drives step by step.

The per-step runner ships one function call per sandbox; a session is the
other shape of work Modal sandboxes are made for: open one idle sandbox, run
commands in it (untrusted or generated code, test cases, evaluations), move
files in and out, snapshot its filesystem and start new sessions from the
snapshot, re-attach to it by id from another task.

What makes it Prefect-native rather than a thin wrapper of `modal.Sandbox`:

* each command's output is streamed live into the logs of the run that runs
  it (stdout at INFO, stderr at WARNING, secret env values redacted);
* each session is an artifact on its run (id, app, spec, image, status, the
  commands it ran, the snapshots it took, how to look at it) and emits the
  sandbox lifecycle events of `events.py`; `prefect-modal status` lists it;
* it ends with its ``with`` block, else with its task run (``keep=False``) or
  with its flow run (``keep=True``), whichever owns it; its lifetime
  (``spec.timeout``) is the backstop for a process that died.  A cancelled
  or crashed flow run ends its sessions through the registry the task runner
  uses for its own sandboxes (`sandbox_call.registry_for`), and a watcher
  that follows the owning runs' states through the Prefect API;
* a snapshot is a small pydantic model, so it can be a task's result and be
  persisted by Prefect like any other.

Nothing here imports `modal`: every Modal call is in `sandboxes.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from prefect_modal import events, resources, sandboxes
from prefect_modal import tags as tag_keys
from prefect_modal.artifacts import KEY_PREFIX, SandboxArtifact
from prefect_modal.credentials import ModalCredentials, ambient_credentials_present
from prefect_modal.settings import SandboxSpec

if TYPE_CHECKING:
    from prefect_modal.targets import Target

#: How often the watcher asks the Prefect API whether a session's owning run ended.
WATCH_INTERVAL_SECONDS = 1.0
#: Commands listed in a session's artifact (the latest ones).
COMMANDS_KEPT = 50
#: Characters of one command shown in the artifact.
COMMAND_CHARS = 200
#: Artifact keys of sessions: under the sandbox prefix, so `status` reads them too.
SESSION_KEY_PREFIX = f"{KEY_PREFIX}session-"
#: Tag on a session's sandbox: "true" when it outlives its task.
KEEP_TAG = "prefect-modal.session-keep"
#: The registry sessions use when the flow's task runner is not a ModalTaskRunner.
SESSIONS_FAMILY = "prefect-modal-sessions"

_EXIT_STATUS = {0: "succeeded", 137: "terminated", 124: "timeout"}

logger = logging.getLogger("prefect_modal.sessions")

SessionStatus = Literal["running", "succeeded", "failed", "terminated", "timeout", "gone"]


class SessionError(RuntimeError):
    """A session cannot do what was asked; the message says what to do instead."""


class SessionEndedError(SessionError):
    """The session's sandbox has finished (terminated, timed out, or gone)."""


class SessionUnavailableError(SessionError):
    """Sessions cannot be opened from here (inside a sandbox without Modal credentials)."""


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    """What one command did: exit code and all of its output, as text."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check_returncode(self) -> ExecResult:
        """Raise `subprocess.CalledProcessError` unless the command exited 0 (as
        `subprocess.CompletedProcess.check_returncode` does); returns self."""
        if self.returncode != 0:
            raise subprocess.CalledProcessError(
                self.returncode, list(self.command), self.stdout, self.stderr
            )
        return self


@dataclass(frozen=True)
class OutputLine:
    """One line a streaming command printed, on `stream` ("stdout" or "stderr")."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class SandboxFile:
    """An entry of `SandboxSession.list_files`."""

    name: str
    path: str
    type: str  # "file", "directory" or "symlink"
    size: int
    modified_time: int


class SandboxSnapshot(BaseModel):
    """A session's filesystem at one moment: start new sessions from it with
    `SandboxSession.restore`.

    Small and JSON-serializable, so it can be a task's result and cross from one
    task (or flow run) to another through Prefect's result persistence.  The
    image it names lives on the Modal it was taken on.  Secret env values are
    not kept (names are, in `secret_env_names`): pass them again in
    ``restore(snapshot, spec=SandboxSpec(env=...))``, or use named Modal secrets.
    """

    model_config = ConfigDict(frozen=True)

    image_id: str = Field(description="Modal image id of the snapshot ('im-...').")
    source_session_id: str = Field(description="The session (sandbox id) it was taken of.")
    spec: SandboxSpec = Field(description="The session's spec, secret env values left out.")
    secret_env_names: list[str] = Field(default_factory=list)
    block_network: bool = False
    target: str = Field(default="modal", description="'local' or 'modal': where the image is.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def _spec_without_secrets(spec: SandboxSpec) -> SandboxSpec:
    data = spec.model_dump(exclude_unset=True)
    if spec.env:
        plain = spec.plain_env()
        data["env"] = plain or None
    return SandboxSpec(**data)


# -- the artifact ---------------------------------------------------------------------


class SessionRecord(SandboxArtifact):
    """A session's artifact: the sandbox record plus what the session did."""

    session: bool = True
    keep: bool = False
    image: str | None = None
    restored_from: str | None = None
    commands: list[str] = Field(default_factory=list)
    snapshots: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        # One artifact per session (a task may open several); keys are ^[a-z0-9-]*$
        # and base62 sandbox ids are case-sensitive, hence a digest.
        digest = hashlib.sha256(self.sandbox_id.encode()).hexdigest()[:32]
        return f"{SESSION_KEY_PREFIX}{digest}"

    def description(self) -> str:
        exit_text = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        lifetime = (
            "ends with its flow run (keep=True)"
            if self.keep
            else "ends with its task run or `with` block"
        )
        where = f" See: `{self.link}`." if self.link else ""
        run = f" `prefect-modal status {self.flow_run_id}`." if self.flow_run_id else ""
        return (
            f"Sandbox session `{self.sandbox_id}` ({self.status}{exit_text}) in app "
            f"`{self.app_name}` on {self.target}; {len(self.commands)} command(s), "
            f"{len(self.snapshots)} snapshot(s); {lifetime}.{where}{run}"
        )


class _ArtifactQueue:
    """Writes session records in the background, in order (one API call each)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-modal-session")
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []

    def write(self, record: SessionRecord) -> Future[None]:
        snapshot = record.model_copy(deep=True)
        future = self._pool.submit(copy_context().run, _write_record, snapshot)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def flush(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                return


def _write_record(record: SessionRecord) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(
                ArtifactCreate(
                    key=record.key,
                    type="table",
                    description=record.description(),
                    data=json.dumps(record.rows()),
                    flow_run_id=record.flow_run_id,
                    task_run_id=record.task_run_id,
                )
            )
    except Exception as exc:  # a record is for people; never fail the session for it
        logger.warning(
            "prefect-modal: could not write the artifact of %s: %s", record.sandbox_id, exc
        )


_artifacts = _ArtifactQueue()


# -- where a session runs: the Prefect run around it ----------------------------------


@dataclass
class _RunInfo:
    flow_run_id: UUID | None = None
    task_run_id: UUID | None = None
    task_name: str | None = None
    #: The flow's task runner when it is a ModalTaskRunner (its registry ends us).
    runner: Any = None


def _current_run() -> _RunInfo:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return _RunInfo()
    task_ctx = TaskRunContext.get()
    flow_ctx = FlowRunContext.get()
    info = _RunInfo()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        info.flow_run_id = flow_ctx.flow_run.id
        runner = flow_ctx.task_runner
        if hasattr(runner, "_family") and type(runner).__name__ == "ModalTaskRunner":
            info.runner = runner
    if task_ctx is not None:
        info.task_run_id = task_ctx.task_run.id
        info.task_name = task_ctx.task.name
        info.flow_run_id = info.flow_run_id or task_ctx.task_run.flow_run_id
    return info


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The current run's logger (task run, else flow run), else this module's."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging.loggers import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger()
    except Exception:
        pass
    return logger


def _check_reachable(credentials: ModalCredentials | None) -> None:
    """Refuse clearly inside a sandbox that cannot reach Modal (a per-step task's).

    Such a sandbox has no Modal token, and resolving a target there would start a
    local Modal server *inside the sandbox*: never what anyone wants.
    """
    inside = os.environ.get("MODAL_SANDBOX_ID") or os.environ.get("MODAL_TASK_ID")
    if not inside:
        return
    if (credentials is not None and credentials.has_token) or ambient_credentials_present():
        return
    raise SessionUnavailableError(
        f"SandboxSession: this code runs inside Modal sandbox {inside}, which has no Modal "
        "credentials, so it cannot open or attach to a session. A task that drives sessions "
        "should run in the flow's process: mark it @modal_options(local=True) under a "
        "ModalTaskRunner, or open the session in the flow body; or pass "
        "credentials=ModalCredentials.load(...) to reach Modal from inside the sandbox."
    )


def _target(credentials: ModalCredentials | None) -> Target:
    from prefect_modal.targets import resolve_target

    _check_reachable(credentials)
    return resolve_target(credentials)


def _check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(
            f"{what}: path={path!r} must be an absolute path inside the sandbox, "
            "e.g. '/workspace/data.txt'."
        )
    return path


def _check_command(command: Sequence[Any]) -> tuple[str, ...]:
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


def _check_timeout(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"exec(): timeout={timeout!r} must be a number of seconds above 0.")
    return max(1, math.ceil(timeout))


# -- a running command ------------------------------------------------------------------


class SandboxProcess:
    """A command running in a session: iterate it for its output lines as they come,
    `wait()` for its `ExecResult`.

    Every line is also logged on the run that started the command (stdout at
    INFO, stderr at WARNING), whether or not anyone iterates.
    """

    def __init__(
        self,
        session: SandboxSession,
        command: tuple[str, ...],
        process: Any,
        run_logger: Any,
        timeout: int | None,
        streaming: bool,
    ) -> None:
        self.command = command
        self._session = session
        self._process = process
        self._logger = run_logger
        self._timeout = timeout
        self._started = time.monotonic()
        self._lines: queue.Queue[OutputLine | None] | None = queue.Queue() if streaming else None
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._result: ExecResult | None = None
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=copy_context().run,
                args=(self._follow, name, reader),
                name=f"prefect-modal-session-{name}",
                daemon=True,
            )
            for name, reader in (("stdout", process.stdout), ("stderr", process.stderr))
        ]
        for thread in self._threads:
            thread.start()

    def _follow(self, stream: Literal["stdout", "stderr"], reader: Any) -> None:
        pending = ""
        try:
            for chunk in reader:
                self._text[stream].append(chunk)
                pending += chunk
                *complete, pending = pending.split("\n")
                for line in complete:
                    self._emit(stream, line)
            if pending:
                self._emit(stream, pending)
        except Exception as exc:  # a dropped stream must not hang the caller
            self._emit("stderr", f"[prefect-modal] {stream} of the command ended early: {exc}")
        finally:
            if self._lines is not None:
                self._lines.put(None)

    def _emit(self, stream: Literal["stdout", "stderr"], line: str) -> None:
        line = line.rstrip("\r")
        shown = self._session._redact(line)
        level = logging.INFO if stream == "stdout" else logging.WARNING
        self._logger.log(level, "[session %s] %s", self._session.session_id, shown)
        if self._lines is not None:
            self._lines.put(OutputLine(stream, line))

    def __iter__(self) -> Iterator[OutputLine]:
        if self._lines is None:
            raise SessionError("iterate the handle of exec_stream(); exec() returns a result")
        ended = 0
        while ended < 2:
            item = self._lines.get()
            if item is None:
                ended += 1
                continue
            yield item

    @property
    def returncode(self) -> int | None:
        """None while the command runs."""
        return self._result.returncode if self._result else self._process.poll()

    def wait(self) -> ExecResult:
        """Block until the command ends; its result (the same one on every call)."""
        with self._lock:
            if self._result is not None:
                return self._result
            code = sandboxes.process_wait(self._process)
            for thread in self._threads:
                thread.join(timeout=30)
            seconds = time.monotonic() - self._started
            timed_out = self._timeout is not None and code != 0 and seconds >= self._timeout
            if timed_out:
                self._logger.warning(
                    "[session %s] %s timed out after %s s (exit code %s)",
                    self._session.session_id,
                    self._session._redact(" ".join(self.command))[:COMMAND_CHARS],
                    self._timeout,
                    code,
                )
            self._result = ExecResult(
                command=self.command,
                returncode=code,
                stdout="".join(self._text["stdout"]),
                stderr="".join(self._text["stderr"]),
                seconds=seconds,
                timed_out=timed_out,
            )
            self._session._note_command(self._result)
            return self._result


# -- the session --------------------------------------------------------------------------


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
        run: _RunInfo,
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
        merged = snapshot.spec.merged_with(_as_spec(spec))
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
        origin = _live_sessions.get(session_id)
        target = origin._target if origin is not None else _target(credentials)
        try:
            sandbox = sandboxes.from_id(session_id, target.client)
            code = sandboxes.poll(sandbox)
        except sandboxes.NotFoundError:
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
            run=_current_run(),
            origin=origin,
        )
        _run_logger().info("Attached to sandbox session %s", session_id)
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
        spec = _as_spec(spec) or SandboxSpec()
        if credentials is not None and not isinstance(credentials, ModalCredentials):
            raise TypeError(
                f"credentials must be a ModalCredentials block, not {type(credentials).__name__}."
            )
        for name, value in (("keep", keep), ("block_network", block_network)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True or False.")
        run = _current_run()
        target = _target(credentials)
        tags = {tag_keys.MODE: "session", KEEP_TAG: "true" if keep else "false"}
        if run.flow_run_id:
            tags[tag_keys.FLOW_RUN] = str(run.flow_run_id)
        if run.task_run_id:
            tags[tag_keys.TASK_RUN] = str(run.task_run_id)
        if run.task_name:
            tags[tag_keys.TASK_NAME] = run.task_name[:60]
        sandbox = sandboxes.create_session_sandbox(
            spec, client=target.client, tags=tags, image_id=image_id, block_network=block_network
        )
        sandbox_id = sandboxes.sandbox_id(sandbox)
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
            link=sandboxes.dashboard_url(sandbox_id, spec.effective_app_name, target.server_url),
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
        _run_logger().info(
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
        _live_sessions[self.session_id] = self
        family = self._run.runner._family if self._run.runner is not None else SESSIONS_FAMILY
        from prefect_modal.sandbox_call import registry_for

        self._registry = registry_for(family)
        self._registry.add(self)
        if record.flow_run_id is not None:
            self._events = events.for_record(record)
            self._events.created()
            self._events.running()
            _artifacts.write(record)
            _watch(self)

    # -- facts -------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The sandbox id: what `attach` takes, what Modal and `prefect-modal` show."""
        return sandboxes.sandbox_id(self._sandbox)

    @property
    def returncode(self) -> int | None:
        """None while the session runs; else its sandbox's exit code (137: terminated)."""
        try:
            return sandboxes.poll(self._sandbox)
        except sandboxes.NotFoundError:
            return None

    @property
    def status(self) -> SessionStatus:
        """Live, from Modal: running, succeeded, failed, terminated, timeout or gone."""
        try:
            code = sandboxes.poll(self._sandbox)
        except sandboxes.NotFoundError:
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
        cmd = _check_command(command)
        seconds = _check_timeout(timeout)
        workdir = resources.check_absolute_path(workdir, field="workdir")
        if env is not None:
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()
            ):
                raise TypeError("exec(): env must map variable names to string values.")
        self._check_running("exec")
        process = sandboxes.exec_process(
            self._sandbox, cmd, workdir=workdir, env=env, timeout=seconds
        )
        return SandboxProcess(self, cmd, process, _run_logger(), seconds, streaming)

    # -- files ----------------------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to the sandbox's absolute `path` (parent directories are made)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"write_bytes(): data must be bytes, not {type(data).__name__}.")
        sandboxes.fs_write_bytes(self._sandbox, _check_path(path, "write_bytes"), bytes(data))

    def write_text(self, path: str, text: str, encoding: str = "utf-8") -> None:
        """Write `text` to the sandbox's absolute `path` (parent directories are made)."""
        if not isinstance(text, str):
            raise TypeError(f"write_text(): text must be str, not {type(text).__name__}.")
        self.write_bytes(_check_path(path, "write_text"), text.encode(encoding))

    def read_bytes(self, path: str) -> bytes:
        """The bytes of the sandbox's file `path`; FileNotFoundError if it has none."""
        return sandboxes.fs_read_bytes(self._sandbox, _check_path(path, "read_bytes"))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(_check_path(path, "read_text")).decode(encoding)

    def list_files(self, path: str = "/") -> list[SandboxFile]:
        """The entries of the sandbox's directory `path`, sorted by name."""
        entries = sandboxes.fs_list(self._sandbox, _check_path(path, "list_files"))
        return sorted((SandboxFile(**e) for e in entries), key=lambda f: f.name)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove the sandbox's file `path` (a directory needs ``recursive=True``)."""
        sandboxes.fs_remove(self._sandbox, _check_path(path, "remove"), recursive=recursive)

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot(self) -> SandboxSnapshot:
        """Snapshot the session's filesystem (volumes excluded), for `restore`."""
        self._check_running("snapshot")
        image_id = sandboxes.snapshot_filesystem(self._sandbox)
        snap = SandboxSnapshot(
            image_id=image_id,
            source_session_id=self.session_id,
            spec=_spec_without_secrets(self.spec),
            secret_env_names=sorted(self.spec.secret_env()),
            block_network=self.block_network,
            target=self._target.kind,
        )
        source = self._origin or self
        if source._record is not None:
            source._record.snapshots.append(image_id)
            _artifacts.write(source._record)
        _run_logger().info("Snapshot %s taken of sandbox session %s", image_id, self.session_id)
        return snap

    # -- ending ---------------------------------------------------------------------------------

    def terminate(self) -> None:
        """End the session now (any handle may); a no-op once it has ended."""
        if self._origin is not None:
            self._origin._end("terminated by an attached handle")
            return
        if not self._owned:
            sandboxes.terminate(self._sandbox)
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
            sandboxes.detach(self._sandbox)

    def _end(self, why: str) -> None:
        """Terminate (if it still runs), write the final record, emit the events."""
        with self._end_lock:
            if self._ended.is_set():
                return
            try:
                code = sandboxes.poll(self._sandbox)
            except sandboxes.NotFoundError:
                code = None
            terminated = False
            if code is None:
                sandboxes.terminate(self._sandbox)
                terminated = True
                code = 137
            self._ended.set()
        _live_sessions.pop(self.session_id, None)
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
            _artifacts.write(record)
            _artifacts.flush()
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
            _artifacts.write(source._record)


def _as_spec(spec: Any) -> SandboxSpec | None:
    if spec is None or isinstance(spec, SandboxSpec):
        return spec
    if isinstance(spec, dict):
        return SandboxSpec(**spec)
    raise TypeError(f"spec must be a SandboxSpec, not {type(spec).__name__}.")


def _describe_exit(code: int) -> str:
    meaning = {137: "terminated", 124: "reached its timeout", 0: "its command ended"}
    return f"exit code {code}: {meaning.get(code, 'failed')}"


# -- ending with the run that owns a session ------------------------------------------------

_live_sessions: dict[str, SandboxSession] = {}
_watch_lock = threading.Lock()
_watched: dict[UUID, set[SandboxSession]] = {}


def _watch(session: SandboxSession) -> None:
    """Follow the session's owning runs: one watcher thread per flow run with sessions."""
    flow_run_id = session._run.flow_run_id
    assert flow_run_id is not None
    with _watch_lock:
        sessions = _watched.get(flow_run_id)
        if sessions is not None:
            sessions.add(session)
            return
        _watched[flow_run_id] = {session}
    thread = threading.Thread(
        target=copy_context().run,
        args=(_watch_flow_run, flow_run_id),
        name=f"prefect-modal-sessions-{flow_run_id}",
        daemon=True,
    )
    thread.start()


def _owner_ended(state: Any) -> bool:
    return state is None or state.is_final() or state.is_cancelling()


def _watch_flow_run(flow_run_id: UUID) -> None:
    """End the flow run's sessions when it ends (any way), and each unkept session
    of a task when that task run is final."""
    from prefect.client.orchestration import get_client

    client: Any = None
    while True:
        with _watch_lock:
            sessions = {s for s in _watched.get(flow_run_id, set()) if not s.ended}
            if not sessions:
                _watched.pop(flow_run_id, None)
                break
            _watched[flow_run_id] = sessions
        try:
            if client is None:
                client = get_client(sync_client=True)
                client.__enter__()
            flow_state = client.read_flow_run(flow_run_id).state
            if _owner_ended(flow_state):
                why = f"its flow run is {flow_state.name if flow_state else 'gone'}"
                threads = [t for s in sessions if (t := s.cancel(why)) is not None]
                for thread in threads:
                    thread.join(timeout=30)
                continue
            tasks = {s._run.task_run_id for s in sessions if not s.keep and s._run.task_run_id}
            for task_run_id in tasks:
                assert task_run_id is not None
                state = client.read_task_run(task_run_id).state
                if state is not None and state.is_final():
                    why = f"its task run is {state.name}"
                    for s in sessions:
                        if s._run.task_run_id == task_run_id and not s.keep:
                            s.cancel(why)
        except Exception as exc:  # the API may hiccup; the sandbox timeout is the backstop
            logger.debug("prefect-modal: session watcher of %s: %s", flow_run_id, exc)
            if client is not None:
                try:
                    client.__exit__(None, None, None)
                except Exception:
                    pass
                client = None
        time.sleep(WATCH_INTERVAL_SECONDS)
    if client is not None:
        try:
            client.__exit__(None, None, None)
        except Exception:
            pass


def sessions_of_this_process() -> list[SandboxSession]:
    """The sessions this process opened and has not ended (for tests and tools)."""
    return list(_live_sessions.values())


__all__ = [
    "ExecResult",
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
