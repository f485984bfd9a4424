"""One task call in one sandbox: create it, send the call, stream its output, read the outcome.

`ModalTaskRunner` hands Prefect's engine a task whose function builds a
`SandboxCall` and runs it, so everything Prefect does around a call (states,
retries, caching, timeouts, hooks) is untouched.  The engine thread only waits
on an event, in short slices: Prefect delivers a task timeout by raising an
exception *asynchronously* in that thread, which lands only between Python
bytecodes, and a cancelled flow needs the sandbox gone at once.  All blocking
Modal calls happen in one driver thread per call.

Nothing here imports `modal`: sandboxes go through `core.modal_api`.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable
from contextvars import copy_context
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import cloudpickle

from prefect_modal import events
from prefect_modal.core import modal_api, packages
from prefect_modal.core import tags as tag_keys
from prefect_modal.core.artifacts import SandboxArtifact, SandboxStatus
from prefect_modal.core.cancellation import CallRegistry
from prefect_modal.core.errors import PrefectModalError
from prefect_modal.core.spec import DEFAULT_TIMEOUT_SECONDS, SandboxSpec
from prefect_modal.task_runner import remote
from prefect_modal.task_runner.artifact_writer import ArtifactWriter
from prefect_modal.task_runner.nested import NestedCalls
from prefect_modal.task_runner.pickling import dumps_call, is_user_module
from prefect_modal.task_runner.warm import (
    PoolClosedError,
    StartPlan,
    WarmPool,
    WarmSandbox,
    WarmStartError,
    pool_key,
)
from prefect_modal.task_runner.warm_records import WarmRecord

#: The Python minor version the payload is pickled with; the sandbox must match.
LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

#: Largest pickled result a sandbox may send back through its output stream; bigger
#: ones go by reference on a volume (`result_refs.py`) or fail with the fix.  Modal
#: serves a V2 sandbox's output from a window ("only the most recent portion of output
#: is retained", modal/io_streams.py) whose size it does not publish; the local server
#: assumes 64 MiB (docs/modal-rules.md).  A result travels as base64 (4/3 of its size),
#: read once the sandbox ends, so 32 MiB (43 MiB on the stream) stays inside it.
DEFAULT_MAX_RESULT_BYTES = 32 * 1024 * 1024

#: Largest pickled call sent through a sandbox's stdin.  Bigger ones go by reference on
#: the call's result volume (`result_refs.py`), else fail before any sandbox starts:
#: stdin goes through Modal's server in drained chunks (`modal_api.send_stdin`), and a
#: data set belongs on a Volume, not in every call.  Modal publishes no limit; this is
#: ours (an assumption, docs/modal-rules.md).
MAX_STDIN_PAYLOAD_BYTES = 64 * 1024 * 1024

#: Seconds added to a task's `timeout_seconds` for the sandbox's own lifetime:
#: Prefect's timeout fires first; Modal's lifetime is the backstop for a flow
#: process that died and can no longer terminate anything.
LIFETIME_GRACE_SECONDS = 30

#: How often the engine thread wakes up to let Prefect's timeout land.
_WAIT_SLICE = 0.1

#: How often a call waiting for a free sandbox slot looks for cancellation.
_SLOT_SLICE = 0.25

#: A sandbox still running this long after its start gets a "running" artifact,
#: so the UI and `status` show it; shorter ones get only their final record,
#: which halves the API writes of a map of small tasks.
RUNNING_RECORD_AFTER_S = 2.0

#: Output lines kept for the message of a sandbox that died without a result.
TAIL_LINES = 20

logger = logging.getLogger("prefect_modal.task_runner")

EXIT_MEANINGS = {
    137: "terminated (SIGKILL): killed from outside, out of memory, or cancelled",
    124: "timed out: the sandbox reached its lifetime",
    127: "command not found: the image has no `python` on PATH",
    3: "the prefect-modal bootstrap could not start the call",
}


# -- errors a task run can end with ----------------------------------------------


class SandboxCallError(PrefectModalError, RuntimeError):
    """A sandbox ended without sending the call's outcome back."""


class SandboxCrashedError(SandboxCallError):
    """The sandbox died (killed, OOM, crashed interpreter) before reporting a result."""


class ResultTooLargeError(SandboxCallError):
    """The task's result is over the runner's `max_result_bytes`."""


class PythonVersionMismatchError(SandboxCallError):
    """The image's Python is not the flow's Python minor version."""


class PayloadTooLargeError(PrefectModalError, ValueError):
    """A call's pickled arguments are too large for stdin and no volume can carry them."""


class SandboxImageError(SandboxCallError):
    """The image lacks something the call needs (cloudpickle, the user's packages)."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a sandbox (set as `__cause__`)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class RemoteError(PrefectModalError):
    """An exception raised remotely whose own type could not travel back."""


class RemoteKeyboardInterrupt(KeyboardInterrupt):
    """KeyboardInterrupt raised by the task in its sandbox: the task crashes, not the flow."""


class RemoteSystemExit(SystemExit):
    """SystemExit raised by the task in its sandbox: the task crashes, not the flow."""


REMOTE_INTERRUPTS = (RemoteKeyboardInterrupt, RemoteSystemExit)


# -- what a call knows about its task run --------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """The Prefect side of a call: who it is for, for names, tags, logs and artifacts."""

    task_run_id: UUID
    flow_run_id: UUID | None
    task_name: str
    attempt: int
    timeout_seconds: float | None = None

    @property
    def sandbox_name(self) -> str:
        """Deterministic: one name per (flow run, task run, attempt), unique within an app."""
        flow = self.flow_run_id.hex[:8] if self.flow_run_id else "noflow"
        return f"pf-{flow}-{self.task_run_id.hex}-{self.attempt}"

    @property
    def tags(self) -> dict[str, str]:
        tags = {
            tag_keys.TASK_RUN: str(self.task_run_id),
            tag_keys.ATTEMPT: str(self.attempt),
            tag_keys.TASK_NAME: self.task_name,
            tag_keys.MODE: "per_step",
        }
        if self.flow_run_id:
            tags[tag_keys.FLOW_RUN] = str(self.flow_run_id)
        return tags


# -- one call ------------------------------------------------------------------------


@dataclass
class CallEnvironment:
    """What a call borrows from its runner."""

    client: Any
    target_kind: str
    server_url: str
    registry: CallRegistry
    semaphore: threading.BoundedSemaphore
    artifacts: ArtifactWriter
    on_record: Callable[[SandboxArtifact], None]
    owner: object
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    log_level: int = logging.INFO
    #: The flow run's warm sandboxes (None: every call gets a fresh sandbox).
    pool: WarmPool | None = None

    def acquire_slot(self, timeout: float) -> bool:
        """A slot for a per-call sandbox (an idle warm one may be retired for it)."""
        if self.pool is not None:
            return self.pool.acquire(None, timeout)
        return self.semaphore.acquire(timeout=timeout)

    def release_slot(self) -> None:
        if self.pool is not None:
            self.pool.release_slot()
        else:
            self.semaphore.release()


def _crash_error(
    sandbox_id: str | None,
    returncode: int | None,
    tail: list[str],
    before: str,
    lifetime_s: int | None = None,
) -> BaseException:
    """A sandbox that ended `before` something (its result, its bootstrap's start): its
    exit code, what that code means and its last output lines.  One that reached its
    lifetime (`lifetime_s`; Modal reports it as a timeout, exit code 124) is a
    `TimeoutError` that names the limit."""
    lines = "\n".join(tail[-TAIL_LINES:]) or "(no output)"
    if returncode == 124:
        limit = f" after {lifetime_s} s" if lifetime_s else ""
        return TimeoutError(
            f"Modal sandbox {sandbox_id} timed out{limit} (its `timeout`, exit code 124) "
            f"before {before}: raise the task's timeout_seconds or "
            f"modal_options(timeout=...). Last output lines:\n{lines}"
        )
    meaning = EXIT_MEANINGS.get(returncode or 0, "")
    message = (
        f"Modal sandbox {sandbox_id} ended with exit code {returncode}"
        + (f" ({meaning})" if meaning else "")
        + f" before {before}. Last output lines:\n{lines}"
    )
    return SandboxCrashedError(message)


def _start_failure(exc: WarmStartError) -> BaseException:
    """A warm sandbox that died before its bootstrap started, told as a call's crash."""
    return _crash_error(exc.sandbox_id, exc.returncode, exc.tail, "its bootstrap started")


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    cancelled: str | None = None


@dataclass(eq=False)
class SandboxCall:
    """One call of a task's function in one sandbox."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    spec: SandboxSpec
    info: CallInfo
    env: CallEnvironment
    run_logger: Any
    #: Captures the task run's Prefect context (in the engine thread); used only
    #: when the call's code refers to Prefect.
    capture_context: Callable[[], dict[str, Any]] | None = None
    #: Submits a task on the flow's runner: how nested submits from the sandbox run.
    submit_child: Callable[..., Any] | None = None
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    #: Run on a warm sandbox of the flow run's pool (when the runner has one).
    reuse: bool = False
    #: Where a result over `max_result_bytes` goes by reference (`result_refs.py`).
    result_volume: Any = None

    def __post_init__(self) -> None:
        self.owner = self.env.owner
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._sandbox: Any = None
        self._cancel_reason: str | None = None
        self._terminator: threading.Thread | None = None
        self._outcome = _Outcome()
        self._tail: list[str] = []
        self.record: SandboxArtifact | None = None
        self._finished = False
        self._running_timer: threading.Timer | None = None
        self._events: events.SandboxEvents | None = None
        self.requirements = packages.Requirements(modules=(), pins=())
        self._nested: NestedCalls | None = None
        self._stdin_lock = threading.Lock()
        self._stdout_chunks: list[str] = []
        # warm mode: what the sandbox's readers hand this call
        self._warm: WarmSandbox | None = None
        self._warm_frames: dict[str, bytes] = {}
        self._warm_settled = threading.Event()
        self._warm_end = threading.Event()
        self._warm_exit: int | None = None
        self._warm_exited = False
        self.call_index: int | None = None

    # -- the engine thread ---------------------------------------------------------

    def run(self) -> Any:
        """Run the call and return what the function returned (or raise what it raised)."""
        payload = dumps_call(self.fn, self.args, self.kwargs)
        self.requirements = packages.requirements(
            packages.call_modules(self.fn, self.args, self.kwargs, payload, is_user_module),
            is_user_module,
        )
        with_context = self.requirements.uses_prefect and self.capture_context is not None
        if with_context:
            assert self.capture_context is not None
            payload = dumps_call(self.fn, self.args, self.kwargs, self.capture_context())
            if self.submit_child is not None:
                self._nested = NestedCalls(
                    self.submit_child, self._reply, self.nonce, copy_context(), self.run_logger
                )
        self.spec = self._with_packages(self.spec)
        if self.result_volume is not None:
            self.spec = self.result_volume.spec_with_mount(self.spec)
        size, arg_ref = len(payload), ""
        if size > MAX_STDIN_PAYLOAD_BYTES:
            arg_ref = self._argument_by_reference(payload)
            payload = b""
        header = remote.make_header(
            self.nonce,
            size,
            LOCAL_PYTHON,
            self.env.max_result_bytes,
            self.env.log_level,
            needs=self.requirements.modules,
            context=with_context,
            ref_dir=self.result_volume.header_value() if self.result_volume else "",
            arg_ref=arg_ref,
        )
        self.env.registry.add(self)
        driving = False
        pool = self.env.pool if self.reuse else None
        lease: WarmSandbox | None = None
        try:
            drive: Callable[..., None]
            drive_args: tuple[Any, ...]
            if pool is not None:
                key = pool_key(self.spec)
                while True:
                    try:
                        lease = pool.lease(key, _SLOT_SLICE, self._warm_starter)
                    except PoolClosedError:
                        if self._cancel_reason:  # cancelled while it waited for a sandbox
                            return self._cancelled_state()
                        raise
                    except WarmStartError as exc:  # as a sandbox of its own would have
                        raise _start_failure(exc) from None
                    if lease is not None:
                        break
                    if self._cancel_reason:
                        return self._cancelled_state()
                drive, drive_args = self._drive_warm, (pool, lease, header + payload)
            else:
                while not self.env.acquire_slot(_SLOT_SLICE):
                    if self._cancel_reason:
                        return self._cancelled_state()
                drive, drive_args = self._drive, (header + payload,)
            driver = threading.Thread(
                target=copy_context().run,
                args=(drive, *drive_args),
                name=f"prefect-modal-{self.info.sandbox_name}",
                daemon=True,
            )
            driving = True  # from here on the driver releases the slot and the registry
            driver.start()
            deadline = self._deadline()
            while not self._done.wait(_WAIT_SLICE):
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel("timeout")
                    raise TimeoutError(
                        f"Task run exceeded timeout of {self.info.timeout_seconds} second(s); "
                        f"sandbox {self.sandbox_id} terminated"
                    )
        except BaseException:
            # Prefect's timeout (raised into this thread), Ctrl-C, a cancelled flow:
            # whatever ends the wait ends the sandbox.
            self.cancel("interrupted")
            if pool is not None and lease is not None and not driving:
                pool.give_back(lease, keep=True)  # leased, never used: still warm
            raise
        finally:
            if not driving:
                self.env.registry.discard(self)
            if arg_ref and self.result_volume is not None:  # read, or never to be
                self.result_volume.remove_argument(self.nonce)
        return self._result()

    def _with_packages(self, spec: SandboxSpec) -> SandboxSpec:
        """The default image plus the installed distributions the call refers to.

        A registry image is the user's (the bootstrap checks it instead, and
        names what is missing); `auto_packages=False` turns this off; a
        distribution already in `pip_packages` keeps the user's requirement.
        """
        if spec.image or spec.auto_packages is False:
            return spec
        added = packages.missing_pins(self.requirements.pins, spec.pip_packages or ())
        sources: list[str] = []
        if "prefect_modal" in self.requirements.modules and "prefect_modal" not in (
            spec.local_python_sources or ()
        ):
            # prefect-modal is not on PyPI: its code goes in as local source (as the
            # worker's per_step image does), its dependencies at this environment's versions
            sources = ["prefect_modal"]
            deps = [
                pin
                for pin in packages.dependency_pins("prefect-modal")
                if packages.requirement_name(pin) != "prefect-modal"
            ]
            added += packages.missing_pins(deps, [*(spec.pip_packages or ()), *added])
        if not added and not sources:
            return spec
        self.run_logger.info(
            "Adding to the default image the flow environment's versions of the packages this "
            "call refers to: %s (turn off with modal_options(auto_packages=False))",
            ", ".join([*added, *(f"{s} (local source)" for s in sources)]),
        )
        return spec.merged_with(
            SandboxSpec(pip_packages=added or None, local_python_sources=sources or None)
        )

    def _argument_by_reference(self, payload: bytes) -> str:
        """Put a payload too large for stdin on the result volume (the header's
        ``arg_ref``), or fail the call before any sandbox with the limit and the fix."""
        mib = len(payload) / 2**20
        if self.result_volume is None:
            raise PayloadTooLargeError(
                f"The arguments of {self.info.task_name!r} pickle to {mib:.1f} MiB, over the "
                f"{MAX_STDIN_PAYLOAD_BYTES // 2**20} MiB a call sends through a sandbox's "
                "stdin. Give the runner a volume to carry them "
                "(ModalTaskRunner(result_volume='my-volume') or a ModalVolume result "
                "storage), or pass a path on a Volume instead of the data."
            )
        self.run_logger.info(
            "The call's arguments (%.1f MiB) go by reference on Modal Volume %r",
            mib,
            self.result_volume.block.volume_name,
        )
        return str(self.result_volume.write_argument(self.nonce, payload))

    def _deadline(self) -> float | None:
        if not self.info.timeout_seconds:
            return None
        # A little after Prefect's own, which normally fires first with its own message.
        return time.monotonic() + self.info.timeout_seconds + 1.0

    @property
    def sandbox_id(self) -> str | None:
        return self.record.sandbox_id if self.record else None

    def cancel(self, reason: str) -> threading.Thread | None:
        """Ask the sandbox to go away; never blocks (termination runs in a thread)."""
        with self._lock:
            if self._cancel_reason is None:
                self._cancel_reason = reason
            if (
                self._done.is_set()
                or self._finished
                or self._sandbox is None
                or self._terminator is not None
            ):
                return self._terminator
            sandbox = self._sandbox
            if self._warm is not None:  # its record says it was ended, not crashed
                self._warm.terminated = True
            self._terminator = threading.Thread(
                target=self._terminate, args=(sandbox,), name="prefect-modal-terminate", daemon=True
            )
        self._terminator.start()
        return self._terminator

    @staticmethod
    def _terminate(sandbox: Any) -> None:
        try:
            modal_api.terminate(sandbox)
        except Exception as exc:
            logger.warning("prefect-modal: terminating a sandbox failed: %s", exc)

    # -- the driver thread -------------------------------------------------------

    def _drive(self, stdin_data: bytes) -> None:
        started = False
        try:
            if self._cancel_reason:
                self._outcome = _Outcome(cancelled=self._cancel_reason)
                return
            spec = self._call_spec()
            app, image = modal_api.prepare(spec, self.env.client, self.run_logger.info)
            attached = False
            try:
                sandbox = modal_api.create_sandbox(
                    spec,
                    bootstrap_command(),
                    client=self.env.client,
                    name=self.info.sandbox_name,
                    tags=self.info.tags,
                    app=app,
                    image=image,
                )
            except modal_api.AlreadyExistsError:
                # A restarted flow process finds its attempt still running: follow
                # that sandbox instead of starting the same attempt twice.
                sandbox = modal_api.from_name(
                    spec.effective_app_name,
                    self.info.sandbox_name,
                    self.env.client,
                    environment_name=spec.modal_environment,
                )
                if sandbox is None:
                    raise
                attached = True
            started = True
            with self._lock:
                self._sandbox = sandbox
                cancel_now = self._cancel_reason is not None
            self._start_record(sandbox, spec)
            if cancel_now:
                self._terminate(sandbox)
            elif attached:
                # The earlier process may have died before sending its call: send ours.
                # If it did send one, the bootstrap has read its payload and never
                # reads stdin again, so this is harmless (and may be refused).
                self.run_logger.warning(
                    "Attempt %s of this task run is already running in sandbox %s "
                    "(started by an earlier process): following it instead of starting it again",
                    self.info.attempt,
                    modal_api.sandbox_id(sandbox),
                )
                try:
                    modal_api.send_stdin(sandbox, stdin_data)
                except Exception:
                    pass
            else:
                try:
                    with self._stdin_lock:
                        modal_api.send_stdin(sandbox, stdin_data, eof=self._nested is None)
                except Exception:
                    if not self._cancel_reason:
                        raise  # else: it was terminated under us; the outcome says so
            if self._events is not None:
                self._events.running()
            stdout_reader = self._follow_stdout(sandbox) if self._nested else None
            modal_api.follow_stderr(sandbox, self._on_line)
            returncode = modal_api.wait_returncode(sandbox)
            if stdout_reader is not None:
                stdout_reader.join(timeout=30)
                output = "".join(self._stdout_chunks)
            else:
                output = modal_api.read_stdout(sandbox)
            with self._lock:  # finished: nothing is left to terminate (see `cancel`)
                self._finished = True
            modal_api.detach(sandbox)
            self._outcome = self._interpret(returncode, output, attached)
            self._finish_record(returncode)
        except BaseException as exc:
            self._settle_on_error(exc, started)
        finally:
            self.env.release_slot()
            self.env.registry.discard(self)
            self._done.set()

    def _settle_on_error(self, exc: BaseException, started: bool) -> None:
        """A driver that failed: cancelled (not by its timeout) or the error, recorded."""
        if self._cancel_reason and self._cancel_reason != "timeout":
            self._outcome = _Outcome(cancelled=self._cancel_reason)
        else:
            self._outcome = _Outcome(error=exc)
        if started:
            self._finish_record(None)

    # -- the driver thread, warm mode ----------------------------------------------

    def _warm_starter(self) -> StartPlan:
        """How to start a warm sandbox ahead for this call (it may serve others with
        equal settings, so its name and record are not this task run's)."""
        flow = self.info.flow_run_id.hex[:8] if self.info.flow_run_id else "noflow"
        tags = {
            tag_keys.MODE: "per_step",
            tag_keys.WARM: "1",
            tag_keys.TASK_NAME: self.info.task_name,
        }
        if self.info.flow_run_id:
            tags[tag_keys.FLOW_RUN] = str(self.info.flow_run_id)
        name = f"pf-{flow}-warm-{secrets.token_hex(8)}"
        return StartPlan(
            self.spec, bootstrap_command(), self.env.client, name, tags, self._warm_record
        )

    def _warm_record(self, warm: WarmSandbox) -> WarmRecord:
        """The record of a warm sandbox that now exists: one artifact for all its calls."""
        spec = warm.spec
        record = SandboxArtifact(
            sandbox_id=warm.sandbox_id,
            sandbox_name=warm.name,
            app_name=spec.effective_app_name,
            target=self.env.target_kind,  # type: ignore[arg-type]
            flow_run_id=self.info.flow_run_id,
            mode="per_step",
            resources=spec.describe(),
            link=modal_api.dashboard_url(
                warm.sandbox_id, spec.effective_app_name, self.env.server_url
            ),
            calls=[],
        )
        return WarmRecord(record, self.env.artifacts, self.env.on_record, RUNNING_RECORD_AFTER_S)

    def _drive_warm(self, pool: WarmPool, warm: WarmSandbox, stdin_data: bytes) -> None:
        """Run the call on the warm sandbox it leased."""
        started = False
        try:
            if self._cancel_reason:
                self._outcome = _Outcome(cancelled=self._cancel_reason)
                return
            self._warm = warm
            self.call_index = warm.begin(self)
            with self._lock:
                self._sandbox = warm.sandbox
                cancel_now = self._cancel_reason is not None
            started = True
            self._start_record(warm.sandbox, self.spec)
            if cancel_now:
                warm.terminated = True
                self._terminate(warm.sandbox)
            else:
                try:
                    warm.send_call(stdin_data)
                except Exception:
                    if not self._cancel_reason and not warm.dead.is_set():
                        raise
            if self._events is not None:
                self._events.running()
            while not self._warm_settled.wait(0.5):
                if warm.dead.is_set():  # it ended before this call became its current one
                    self.on_warm_exit(warm.returncode)
            if not self._warm_exited:
                self._warm_end.wait(5.0)  # the call's last output lines
            elif not self._warm_frames:  # it exited: its last frame may still be in the pipe
                warm.channel_done.wait(5.0)
            with self._lock:
                self._finished = True
            self._outcome = self._outcome_of(
                self._warm_frames, self._warm_exit if self._warm_exited else None
            )
            kind = next(iter(self._warm_frames), None)
            codes = {"OK": 0, "REF": 0, "RAISE": 1}
            code = self._warm_exit if self._warm_exited else codes.get(kind or "", 3)
            self._finish_record(code)
        except BaseException as exc:
            self._settle_on_error(exc, started)
        finally:
            warm.end(self)
            error = self._outcome.error
            keep = not started or (  # a call cancelled before it began leaves it warm
                not self._cancel_reason
                and not self._warm_exited
                and not isinstance(error, (SandboxCrashedError, *REMOTE_INTERRUPTS))
                and (self._warm_frames or error is None)
            )
            pool.give_back(warm, keep=bool(keep))
            self.env.registry.discard(self)
            self._done.set()

    def on_warm_frame(self, kind: str, body: bytes) -> None:
        """A frame of this call from the warm sandbox's channel."""
        if kind == "SUBMIT":
            if self._nested is not None:
                self._nested.on_frame(kind, body)
            return
        if kind in ("OK", "REF", "RAISE", "ERROR"):
            self._warm_frames.setdefault(kind, body)
            self._warm_settled.set()

    def on_warm_line(self, line: str) -> None:
        origin, _level, text = remote.classify_line(line)
        if origin == "end":
            if text == self.nonce:
                self._warm_end.set()
            return
        self._on_line(line)

    def on_warm_exit(self, returncode: int | None) -> None:
        self._warm_exit = returncode
        self._warm_exited = True
        self._warm_settled.set()

    def _follow_stdout(self, sandbox: Any) -> threading.Thread:
        """Read the private channel while the call runs: nested submits arrive on it."""
        nested = self._nested
        assert nested is not None
        reader = remote.FrameReader(self.nonce)

        def on_chunk(chunk: str) -> None:
            self._stdout_chunks.append(chunk)
            for kind, body in reader.feed(chunk):
                nested.on_frame(kind, body)

        def follow() -> None:
            try:
                modal_api.follow_stdout(sandbox, on_chunk)
            except Exception as exc:  # the outcome is judged from what arrived
                logger.debug("prefect-modal: reading the channel ended early: %s", exc)

        thread = threading.Thread(target=follow, name="prefect-modal-channel", daemon=True)
        thread.start()
        return thread

    def _reply(self, data: bytes) -> None:
        """An answer to a nested submit, on the sandbox's stdin."""
        with self._lock:
            sandbox = None if self._finished else self._sandbox
        if sandbox is None:
            return
        if self._warm is not None:  # framed, so it never mixes with the next call
            try:
                self._warm.send_reply(data)
            except Exception as exc:
                logger.debug("prefect-modal: a nested reply could not be sent: %s", exc)
            return
        try:
            with self._stdin_lock:
                modal_api.send_stdin(sandbox, data, eof=False)
        except Exception as exc:  # the sandbox ended meanwhile
            logger.debug("prefect-modal: a nested reply could not be sent: %s", exc)

    def _call_spec(self) -> SandboxSpec:
        """The spec with the sandbox's lifetime capped to the task's timeout (plus grace)."""
        if not self.info.timeout_seconds:
            return self.spec
        lifetime = math.ceil(self.info.timeout_seconds) + LIFETIME_GRACE_SECONDS
        return self.spec.merged_with(
            SandboxSpec(timeout=min(lifetime, self.spec.timeout or DEFAULT_TIMEOUT_SECONDS))
        )

    def _on_line(self, line: str) -> None:
        origin, level, text = remote.classify_line(line)
        if origin == "bootstrap":
            self.run_logger.debug(text)
            return
        if origin == "record":
            self._on_record(level, text)
            return
        self._tail.append(text)
        if len(self._tail) > TAIL_LINES:
            del self._tail[0]
        self.run_logger.log(level, text)

    def _on_record(self, level: int, text: str) -> None:
        """A `get_run_logger()` record from the sandbox, emitted on this task run's logger."""
        try:
            data = json.loads(text)
            message, extra = str(data.get("msg", "")), dict(data.get("extra") or {})
        except (ValueError, AttributeError):
            message, extra = text, {}
        self._tail.append(message)
        if len(self._tail) > TAIL_LINES:
            del self._tail[0]
        try:
            self.run_logger.log(level, message, extra=extra)
        except KeyError:  # an extra field that clashes with a LogRecord attribute
            self.run_logger.log(level, message)

    # -- records -------------------------------------------------------------------

    def _start_record(self, sandbox: Any, spec: SandboxSpec) -> None:
        sid = modal_api.sandbox_id(sandbox)
        warm = self._warm
        self.record = SandboxArtifact(
            sandbox_id=sid,
            sandbox_name=warm.name if warm else self.info.sandbox_name,
            call_in_sandbox=self.call_index,
            app_name=spec.effective_app_name,
            target=self.env.target_kind,  # type: ignore[arg-type]
            flow_run_id=self.info.flow_run_id,
            task_run_id=self.info.task_run_id,
            task_name=self.info.task_name,
            attempt=self.info.attempt,
            mode="per_step",
            resources=spec.describe(),
            status="running",
            link=modal_api.dashboard_url(sid, spec.effective_app_name, self.env.server_url),
        )
        if warm is not None:
            self.run_logger.info(
                "Running in Modal sandbox %s, call %s in this sandbox (%s; %s)",
                sid,
                self.call_index,
                "a new sandbox" if self.call_index == 1 else "warm",
                _resource_summary(spec.describe()),
            )
        else:
            self.run_logger.info(
                "Running in Modal sandbox %s (%s)", sid, _resource_summary(spec.describe())
            )
        # In this (driver) thread's copy of the run context: Prefect's events
        # worker adds the flow, deployment and work pool of the run itself.
        self._events = events.for_record(self.record)
        if warm is not None:  # the sandbox's one record and events (`warm_records.py`)
            if warm.record is not None:
                warm.record.call_began(
                    self.call_index or 0,
                    self.info.task_run_id,
                    self.info.task_name,
                    self.info.attempt,
                )
            return
        self._events.created()
        timer = threading.Timer(
            RUNNING_RECORD_AFTER_S, copy_context().run, args=(self._write_running_record,)
        )
        timer.daemon = True
        timer.start()
        self._running_timer = timer

    def _write_running_record(self) -> None:
        with self._lock:
            if self._done.is_set() or self._finished or self.record is None:
                return
            record = self.record
        self.env.artifacts.write(record, wanted=lambda: not self._finished)

    def _finish_record(self, returncode: int | None) -> None:
        with self._lock:
            self._finished = True
        if self._running_timer is not None:
            self._running_timer.cancel()
        if self.record is None:
            return
        outcome = self._outcome
        status: SandboxStatus
        if outcome.cancelled or returncode == 137:
            status = "terminated"
        elif returncode == 124 or isinstance(outcome.error, TimeoutError):
            status = "timeout"
        elif isinstance(outcome.error, SandboxCrashedError) or returncode is None:
            status = "crashed"
        elif outcome.error is not None:
            status = "failed"
        else:
            status = "succeeded"
        self.record = self.record.model_copy(
            update={
                "status": status,
                "exit_code": returncode,
                "ended_at": datetime.now(timezone.utc),
            }
        )
        if self._warm is not None:
            if self._warm.record is not None:
                self._warm.record.call_ended(self.call_index or 0, status)
        else:
            self.env.artifacts.write(self.record)
            self.env.on_record(self.record)
        if self._events is not None:
            if self._cancel_reason and status in ("terminated", "timeout"):
                self._events.terminated(self._cancel_reason)
            if self._warm is not None:  # a warm sandbox's exit is its own (`warm_records.py`)
                return
            self._events.exited(
                returncode,
                events.exit_reason(status, returncode),
                self.record.seconds,
                self.record.estimated_cost(),
            )

    # -- reading the outcome ---------------------------------------------------------

    def _interpret(self, returncode: int | None, output: str, attached: bool = False) -> _Outcome:
        nonce = (remote.hello_nonce(output) or self.nonce) if attached else self.nonce
        return self._outcome_of(dict(remote.decode_frames(nonce, output)), returncode)

    def _outcome_of(self, frames: dict[str, bytes], returncode: int | None) -> _Outcome:
        if "OK" in frames:
            return _Outcome(value=cloudpickle.loads(frames["OK"]))
        if "REF" in frames and self.result_volume is not None:
            return _Outcome(value=self.result_volume.read(frames["REF"]))
        if "RAISE" in frames:
            return _Outcome(error=self._remote_exception(cloudpickle.loads(frames["RAISE"])))
        if "ERROR" in frames:
            return _Outcome(error=self._bootstrap_error(frames["ERROR"]))
        if self._cancel_reason == "timeout":
            return _Outcome(
                error=TimeoutError(
                    f"Task run exceeded timeout of {self.info.timeout_seconds} second(s)"
                )
            )
        if self._cancel_reason:
            return _Outcome(cancelled=self._cancel_reason)
        return _Outcome(
            error=_crash_error(
                self.sandbox_id,
                returncode,
                self._tail,
                "returning a result",
                (self._warm.spec if self._warm is not None else self._call_spec()).timeout
                or DEFAULT_TIMEOUT_SECONDS,
            )
        )

    def _remote_exception(self, info: dict[str, Any]) -> BaseException:
        where = f"Remote traceback (Modal sandbox {self.sandbox_id}):\n{info.get('traceback', '')}"
        base = info.get("base")
        exc: BaseException
        if base == "KeyboardInterrupt":
            exc = RemoteKeyboardInterrupt(f"KeyboardInterrupt in sandbox {self.sandbox_id}")
        elif base == "SystemExit":
            exc = RemoteSystemExit(info.get("message"))
        else:
            exc = RemoteError(f"{info.get('type')}: {info.get('message')}")
            if info.get("exception") is not None:
                try:
                    exc = cloudpickle.loads(info["exception"])
                except Exception:  # its class exists only remotely
                    pass
        exc.__cause__ = RemoteTraceback(where)
        add_note = getattr(exc, "add_note", None)
        if add_note is not None:  # Python 3.11+: shown with the exception, kept by pickle
            add_note(where)
        return exc

    def _bootstrap_error(self, data: bytes) -> BaseException:
        reason, message = remote.decode_error(data)
        if reason == "python-version":
            return PythonVersionMismatchError(
                f"Modal sandbox {self.sandbox_id}: {message}. Use an image with Python "
                f"{LOCAL_PYTHON} (e.g. 'python:{LOCAL_PYTHON}-slim'), or leave `image` unset: the "
                "default image matches this Python."
            )
        if reason == "too-large":
            return ResultTooLargeError(
                f"{message} (ModalTaskRunner(max_result_bytes=...)). Send it by reference "
                "on a Modal Volume: ModalTaskRunner(result_volume='my-volume'), or a "
                "ModalVolume block as the flow's or task's result_storage. Or return a smaller "
                "value: write large data to a Modal volume (SandboxSpec(volumes={'/data': "
                "'my-volume'})) or to object storage and return its path."
            )
        if reason == "load":
            return SandboxImageError(f"Modal sandbox {self.sandbox_id}: {message}")
        if reason == "missing":
            return SandboxImageError(self._missing_message(message.split(",")))
        return SandboxCallError(f"Modal sandbox {self.sandbox_id}: {message}")

    def _missing_message(self, modules: list[str]) -> str:
        pins = packages.pins_for(modules)
        image = self.spec.image or "the default image"
        fix = (
            "add them with modal_options(pip_packages=[...]) or SandboxSpec(pip_packages=[...]), "
            "or use an image that has them"
        )
        if not self.spec.image and self.spec.auto_packages is False:
            fix += ", or leave auto_packages on"
        have = f" (this flow's environment has {', '.join(pins)})" if pins else ""
        return (
            f"Modal sandbox {self.sandbox_id}: {image} lacks {', '.join(modules)}, which this "
            f"call refers to{have}: {fix}. Nothing of the call ran."
        )

    def _cancelled_state(self) -> Any:
        from prefect.states import Cancelled

        where = f" (sandbox {self.sandbox_id} terminated)" if self.sandbox_id else ""
        return Cancelled(message=f"Task run cancelled: {self._cancel_reason}{where}")

    def _result(self) -> Any:
        outcome = self._outcome
        if outcome.cancelled:
            return self._cancelled_state()
        if outcome.error is not None:
            raise outcome.error
        return outcome.value


def _resource_summary(described: dict[str, Any]) -> str:
    keys = ("gpu", "cpu", "memory_mib", "image", "timeout")
    return ", ".join(f"{k}={described[k]}" for k in keys if described.get(k) is not None)


_source_cache: list[str] = []


def bootstrap_command() -> list[str]:
    """``python -S -c <remote.py>``: -S skips `.pth` processing (the bootstrap does
    the cheap part of `site` itself and the rest on the first missed import)."""
    return ["python", "-S", "-c", _bootstrap_source()]


def _bootstrap_source() -> str:
    """The text of `remote.py`, sent as `python -c` so the image needs no prefect_modal."""
    if not _source_cache:
        with open(remote.__file__, encoding="utf-8") as f:
            _source_cache.append(f.read())
    return _source_cache[0]
