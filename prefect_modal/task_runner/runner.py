"""`ModalTaskRunner`: each submitted task call runs in a Modal Sandbox.

The Prefect task engine stays in the flow's process, in a thread, exactly as
with `ThreadPoolTaskRunner` (which this class extends): states, retries,
caching, timeouts, hooks, result persistence and upstream lineage are
Prefect's own.  Only the call of the user's function travels: `submit()` hands
the engine a copy of the task whose function, when called, runs a
`SandboxCall` (see `call.py`).  So a cache hit starts no sandbox.
Calls with equal sandbox settings share warm sandboxes within a flow run
(`warm.py`, `reuse_sandboxes=True`, the default), one call at a time per
sandbox; `reuse_sandboxes=False` gives every call (and every retry) a fresh one.

Why not a sandbox that runs Prefect's engine itself: importing Prefect and
talking to the API from the sandbox costs about 2 s per task and needs an API
route and key inside the sandbox; this costs one Python start.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import copy_context
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from prefect.client.schemas.objects import RunInput
from prefect.futures import PrefectConcurrentFuture, PrefectFuture, PrefectFutureList
from prefect.logging.loggers import get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from typing_extensions import Self

from prefect_modal.core.artifacts import SandboxArtifact, write_flow_summary
from prefect_modal.core.cancellation import CallRegistry, registry_for
from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.storage import ModalVolume
from prefect_modal.task_runner import result_refs, run_context
from prefect_modal.task_runner.artifact_writer import ArtifactWriter
from prefect_modal.task_runner.call import (
    DEFAULT_MAX_RESULT_BYTES,
    REMOTE_INTERRUPTS,
    CallEnvironment,
    CallInfo,
    SandboxCall,
)
from prefect_modal.task_runner.interrupts import InterruptWatcher
from prefect_modal.task_runner.options import ModalOptions, options_for
from prefect_modal.task_runner.pickling import plain_containers
from prefect_modal.task_runner.result_refs import ResultVolume
from prefect_modal.task_runner.warm import DEFAULT_IDLE_SECONDS, WarmPool

logger = logging.getLogger("prefect_modal.task_runner")

if TYPE_CHECKING:
    from prefect.tasks import Task

    from prefect_modal.core.targets import Target

R = TypeVar("R")

#: Sandboxes running at once per flow run when nothing says otherwise.  Modal
#: scales far beyond it; on the local server every sandbox is a process here.
DEFAULT_MAX_PARALLELISM = 32

#: Longest a runner leaving by an exception waits for its engine threads to record
#: the final states of the tasks whose sandboxes it just terminated.
EXIT_GRACE_SECONDS = 10.0

#: Engine threads when `max_workers` is unset: enough that tasks waiting for a
#: sandbox slot never starve the engine, bounded so a 10k-task map does not
#: start 10k threads.
DEFAULT_MAX_WORKERS = 256


def _new_task_run_id() -> UUID:
    try:
        from prefect._internal.uuid7 import uuid7

        return uuid7()
    except ImportError:  # pragma: no cover - older Prefect
        return uuid.uuid4()


class ModalTaskRunner(ThreadPoolTaskRunner[R]):
    """Run each submitted task call in its own Modal Sandbox, with its own resources.

    Example::

        from prefect import flow, task
        from prefect_modal import ModalTaskRunner, SandboxSpec, modal_options

        @modal_options(gpu="A100", memory="32GiB")
        @task
        def train(data): ...

        @modal_options(local=True)          # runs in the flow's own process
        @task
        def report(model): ...

        @flow(task_runner=ModalTaskRunner(SandboxSpec(cpu=2), max_parallelism=16))
        def pipeline():
            report(train.submit(load.submit()))

    Args:
        spec: sandbox settings for every task (a task's `modal_options` merge
            over it field by field).
        max_parallelism: most sandboxes running at once for one flow run.
        credentials: a `ModalCredentials` block; default: Modal's own config
            (`modal token new`, MODAL_TOKEN_*), else the local Modal server,
            started on demand.  `PREFECT_MODAL_TARGET=local|modal` forces either.
        default_local: True runs tasks in the flow's process unless they say
            `modal_options(local=False)` (send only the GPU steps to Modal).
        max_workers: engine threads (Prefect's ThreadPoolTaskRunner setting);
            default: `PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS` when set, as
            ThreadPoolTaskRunner reads it, else max(256, max_parallelism).
        max_result_bytes: largest pickled return value a sandbox may send back.
        log_level: level of the `logging` root logger inside the sandbox.
        reuse_sandboxes: True (default) lets calls whose effective sandbox
            settings are equal share warm sandboxes within one flow run, one
            call at a time: the start is paid once per sandbox, not per call.
            Module state (imports, caches, globals of installed modules) then
            persists between calls in one sandbox.  False: a fresh sandbox for
            every call (or per task: `modal_options(reuse=False)`).
        idle_seconds: how long a warm sandbox waits idle for another call
            before it is terminated (the sandbox's own `idle_timeout`, this
            plus a minute, is the backstop should the flow process die).
        result_volume: a `ModalVolume` block or a Modal Volume name: a result over
            `max_result_bytes` is written there by the sandbox (the volume is
            mounted in it) and read back through the Volume API.  Default: the
            task's result storage when it is a `ModalVolume` (see `result_refs.py`).

    Only *submitted* calls (`task.submit`, `task.map`) go to the runner; a task
    called directly inside a flow runs in the flow's process, as in Prefect.
    """

    def __init__(
        self,
        spec: SandboxSpec | None = None,
        max_parallelism: int = DEFAULT_MAX_PARALLELISM,
        credentials: ModalCredentials | None = None,
        default_local: bool = False,
        max_workers: int | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        log_level: int = logging.INFO,
        reuse_sandboxes: bool = True,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        result_volume: ModalVolume | str | None = None,
        _family: str | None = None,
    ) -> None:
        if isinstance(spec, dict):
            spec = SandboxSpec(**spec)
        if spec is not None and not isinstance(spec, SandboxSpec):
            raise TypeError(f"spec must be a SandboxSpec, not {type(spec).__name__}")
        if (
            isinstance(max_parallelism, bool)
            or not isinstance(max_parallelism, int)
            or max_parallelism < 1
        ):
            raise ValueError(
                f"max_parallelism={max_parallelism!r} must be a whole number of 1 or more."
            )
        if isinstance(max_result_bytes, bool) or max_result_bytes < 1:
            raise ValueError(f"max_result_bytes={max_result_bytes!r} must be 1 or more bytes.")
        if not isinstance(reuse_sandboxes, bool):
            raise ValueError(f"reuse_sandboxes={reuse_sandboxes!r} must be True or False.")
        if (
            isinstance(idle_seconds, bool)
            or not isinstance(idle_seconds, int | float)
            or not 0 < idle_seconds <= 24 * 3600
        ):
            raise ValueError(
                f"idle_seconds={idle_seconds!r} must be a number of seconds above 0 and at most "
                "86400 (24 hours)."
            )
        super().__init__(max_workers=_engine_threads(max_workers, max_parallelism))
        self.spec = spec or SandboxSpec()
        self.max_parallelism = max_parallelism
        self.credentials = credentials
        self.default_local = default_local
        self.max_result_bytes = max_result_bytes
        self.log_level = log_level
        self.reuse_sandboxes = reuse_sandboxes
        self.idle_seconds = float(idle_seconds)
        self.result_volume = result_refs.check_setting(result_volume)
        self._requested_workers = max_workers
        # One family per user-created runner: its duplicates and unpickled copies
        # share it, so `cancel_all()` on the template reaches the duplicate's calls.
        self._family = _family or uuid.uuid4().hex
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._target: Target | None = None
        self._target_lock = threading.Lock()
        self._semaphore = threading.BoundedSemaphore(self.max_parallelism)
        self._artifacts: ArtifactWriter | None = None
        self._records: list[SandboxArtifact] = []
        self._records_lock = threading.Lock()
        self._pool: WarmPool | None = None
        self._interrupts: InterruptWatcher | None = None

    @property
    def name(self) -> str:
        return "modal"

    @property
    def cancellation(self) -> CallRegistry:
        """Where this runner's family registers what its flow run's cancellation ends:
        its calls and warm pools, and the sandbox sessions opened in the run."""
        return registry_for(self._family)

    # -- the TaskRunner contract -------------------------------------------------------

    def duplicate(self) -> Self:
        return type(self)(
            spec=self.spec,
            max_parallelism=self.max_parallelism,
            credentials=self.credentials,
            default_local=self.default_local,
            max_workers=self._requested_workers,
            max_result_bytes=self.max_result_bytes,
            log_level=self.log_level,
            reuse_sandboxes=self.reuse_sandboxes,
            idle_seconds=self.idle_seconds,
            result_volume=self.result_volume,
            _family=self._family,
        )

    def __eq__(self, value: object) -> bool:
        if not isinstance(value, ModalTaskRunner):
            return False
        return (
            self.spec == value.spec
            and self.max_parallelism == value.max_parallelism
            and self.credentials == value.credentials
            and self.default_local == value.default_local
            and self._max_workers == value._max_workers
            and self.max_result_bytes == value.max_result_bytes
            and self.log_level == value.log_level
            and self.reuse_sandboxes == value.reuse_sandboxes
            and self.idle_seconds == value.idle_seconds
            and self.result_volume == value.result_volume
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by configuration

    def __repr__(self) -> str:
        return (
            f"ModalTaskRunner(spec={self.spec!r}, max_parallelism={self.max_parallelism}, "
            f"default_local={self.default_local}, reuse_sandboxes={self.reuse_sandboxes})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Runners are cloudpickled with their flow: ship configuration only.
        state = super().__getstate__()
        for name in (
            "_target",
            "_target_lock",
            "_semaphore",
            "_artifacts",
            "_records",
            "_records_lock",
            "_executor",
            "_cancel_events",
            "_pool",
            "_interrupts",
        ):
            state.pop(name, None)
        state["_started"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._executor = None
        self._cancel_events = {}
        self._init_runtime()

    def __enter__(self) -> Self:
        super().__enter__()
        self._artifacts = ArtifactWriter()
        if self.reuse_sandboxes:
            self._pool = WarmPool(self._semaphore, self.idle_seconds)
            self.cancellation.add_pool(self, self._pool)
        # Ctrl-C ends this run's sandboxes even while the main thread cannot take it yet.
        watcher = InterruptWatcher(self._on_ctrl_c)
        self._interrupts = watcher if watcher.start() else None
        return self

    def _on_ctrl_c(self) -> None:
        logger.debug("prefect-modal: SIGINT: ending the flow run's sandboxes")
        self._terminate_own("the flow process got Ctrl-C (SIGINT)")

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        """Normal exit: like ThreadPoolTaskRunner, running calls finish, queued ones are
        cancelled.  Exit by an exception (cancelled, crashed, Ctrl-C): this runner's
        sandboxes are terminated and nothing waits for them."""
        logger.debug("prefect-modal: the flow run's task runner exits (%s)", exc_type)
        for event in self._cancel_events.values():
            event.set()
        if exc_type is not None:
            self._terminate_own(f"the flow run ended with {exc_type.__name__}")
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=exc_type is None, cancel_futures=True)
        pool, self._pool = self._pool, None
        if pool is not None:  # the flow run is over: its warm sandboxes end with it
            self.cancellation.discard_pool(pool)
            pool.close(wait=10.0, graceful=exc_type is None)
        if executor is not None:
            if exc_type is not None:
                # Terminated sandboxes end in about a second; let their engine threads
                # record the final states before the process exits (Prefect's API
                # client is gone once the interpreter shuts down), but never hang on them.
                _join_threads(getattr(executor, "_threads", ()), EXIT_GRACE_SECONDS)
        try:
            self._finish_records(timeout=30 if exc_type is None else 3)
        finally:
            interrupts, self._interrupts = self._interrupts, None
            if interrupts is not None:
                interrupts.stop()
            TaskRunner.__exit__(self, exc_type, exc_value, traceback)

    def cancel_all(self) -> None:
        """Terminate every in-flight sandbox of this runner and its duplicates, at once.

        Prefect calls this on the flow's template runner when a flow run is
        cancelled; termination requests go out in background threads so the
        cancellation never waits on Modal.
        """
        self.cancellation.cancel_all("the flow run was cancelled")
        for event in self._cancel_events.values():
            event.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _terminate_own(self, reason: str) -> None:
        self.cancellation.cancel_all(reason, owner=self)

    # -- submit / map ------------------------------------------------------------------

    def submit(  # type: ignore[override]
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[RunInput]] | None = None,
    ) -> PrefectConcurrentFuture[Any]:
        """Submit a task call: a sandbox runs the function, the engine runs here."""
        if not self._started or self._executor is None:
            raise RuntimeError("Task runner is not started")
        from prefect.context import FlowRunContext
        from prefect.task_engine import run_task_async, run_task_sync

        options = self.options_for(task)
        local = options.local or _is_generator(task)
        if local and not options.local:
            self.logger.warning(
                "Task %r is a generator: its values stream to the engine one by one, which a "
                "sandbox call cannot do; it runs in the flow's process.",
                task.name,
            )
        runnable = (
            task
            if local
            else self._remote_task(
                task,
                options.spec or self.spec,
                reuse=self.reuse_sandboxes and options.reuse is not False,
            )
        )

        task_run_id = _new_task_run_id()
        cancel_event = threading.Event()
        self._cancel_events[task_run_id] = cancel_event
        context = copy_context()
        where = "the flow's process" if local else "a Modal sandbox"
        flow_run_ctx = FlowRunContext.get()
        (get_run_logger(flow_run_ctx) if flow_run_ctx else self.logger).debug(
            f"Submitting task {task.name} to {where}..."
        )
        submit_kwargs: dict[str, Any] = dict(
            task=runnable,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            return_type="state",
            dependencies=dependencies,
            context=dict(cancel_event=cancel_event),
        )
        if task.isasync:
            future = self._executor.submit(
                context.run,
                _contain_remote_interrupts,
                asyncio.run,
                run_task_async(**submit_kwargs),
            )
        else:
            future = self._executor.submit(
                context.run,  # type: ignore[arg-type]
                _contain_remote_interrupts,
                run_task_sync,
                **submit_kwargs,
            )
        with self._submission_lock:
            self._active_submission_count += 1
        future.add_done_callback(self._on_executor_future_done)
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    def map(  # type: ignore[override]
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
    ) -> PrefectFutureList[PrefectConcurrentFuture[Any]]:
        # Validate the merged spec once, before any of the mapped calls starts.
        self.options_for(task)
        return super().map(task, parameters, wait_for)  # type: ignore[arg-type]

    def options_for(self, task: Task[Any, Any]) -> ModalOptions:
        """What one submit of `task` gets: runner spec < task's options < `with` blocks."""
        opts = options_for(task)
        local = self.default_local if opts.local is None else opts.local
        spec = self.spec.merged_with(opts.spec) if opts.spec else self.spec
        return ModalOptions(spec=spec, local=local, reuse=opts.reuse)

    # -- the remote function -------------------------------------------------------------

    def _remote_task(
        self, task: Task[Any, Any], spec: SandboxSpec, reuse: bool = False
    ) -> Task[Any, Any]:
        """A copy of `task` whose function runs in a sandbox; everything else is Prefect's.

        A shallow copy keeps the task's key, name, source (for cache keys),
        retries, hooks and result settings; only `fn` changes.
        """
        remote = copy.copy(task)
        remote.fn = _remote_function(task.fn, spec, self, reuse)
        return remote

    def _environment(self) -> CallEnvironment:
        target = self.target()
        if self._artifacts is None:  # used outside `with runner:` by a direct call
            self._artifacts = ArtifactWriter()
        return CallEnvironment(
            client=target.client,
            target_kind=target.kind,
            server_url=target.server_url,
            registry=self.cancellation,
            semaphore=self._semaphore,
            artifacts=self._artifacts,
            on_record=self._remember,
            owner=self,
            max_result_bytes=self.max_result_bytes,
            log_level=self.log_level,
            pool=self._pool,
        )

    def target(self) -> Target:
        """The Modal this runner talks to, resolved on first use (not when built or unpickled)."""
        with self._target_lock:
            if self._target is None:
                from prefect_modal.core.targets import resolve_target

                self._target = resolve_target(self.credentials)
            return self._target

    # -- records ------------------------------------------------------------------------

    def _remember(self, record: SandboxArtifact) -> None:
        with self._records_lock:
            self._records.append(record)

    def records(self) -> list[SandboxArtifact]:
        """Final records of the sandboxes this runner instance ran, in finishing order."""
        with self._records_lock:
            return list(self._records)

    def _finish_records(self, timeout: float) -> None:
        """Wait for the artifact writes, then write the flow run's table of sandboxes."""
        if self._artifacts is not None:
            self._artifacts.flush(timeout=timeout)
        by_flow: dict[UUID, list[SandboxArtifact]] = {}
        for record in self.records():
            if record.flow_run_id is not None:
                by_flow.setdefault(record.flow_run_id, []).append(record)
        for flow_run_id, records in by_flow.items():
            try:
                write_flow_summary(flow_run_id, sorted(records, key=lambda r: r.started_at))
            except Exception as exc:
                self.logger.warning("prefect-modal: could not write the sandbox summary: %s", exc)


def _engine_threads(max_workers: int | None, max_parallelism: int) -> int:
    """Engine threads: `max_workers`, else Prefect's own setting, else our default.

    `PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS` (alias
    `PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS`) is what ThreadPoolTaskRunner
    reads when it is given no `max_workers`; a flow moved to this runner keeps
    it.  It bounds engine threads only: sandboxes stay bounded by `max_parallelism`.
    """
    if max_workers is not None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r} must be a whole number of 1 or more.")
        return max_workers
    from prefect.settings import get_current_settings

    configured = get_current_settings().tasks.runner.thread_pool_max_workers
    if configured:
        return int(configured)
    return max(DEFAULT_MAX_WORKERS, max_parallelism)


def _is_generator(task: Task[Any, Any]) -> bool:
    return bool(getattr(task, "isgenerator", False) or getattr(task, "isasyncgenerator", False))


def _join_threads(threads: Iterable[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in list(threads):
        thread.join(max(0.0, deadline - time.monotonic()))


def _contain_remote_interrupts(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the engine; a KeyboardInterrupt/SystemExit raised *in a sandbox* ends the task
    Crashed (the engine has recorded it) without tearing down the flow process."""
    try:
        return fn(*args, **kwargs)
    except REMOTE_INTERRUPTS as exc:
        from prefect._internal.states import exception_to_crashed_state_sync

        return exception_to_crashed_state_sync(exc)


def _call_for(
    fn: Callable[..., Any],
    spec: SandboxSpec,
    runner: ModalTaskRunner,
    args: Any,
    kwargs: Any,
    reuse: bool = False,
) -> SandboxCall:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:  # pragma: no cover - the engine always sets it
        raise RuntimeError("a ModalTaskRunner task function ran outside a Prefect task run")
    task_run = ctx.task_run
    volume = result_refs.resolve(runner.result_volume, runner.credentials, ctx)
    info = CallInfo(
        task_run_id=task_run.id,
        flow_run_id=task_run.flow_run_id,
        task_name=ctx.task.name,
        attempt=max(1, task_run.run_count),
        timeout_seconds=ctx.task.timeout_seconds,
    )
    return SandboxCall(
        fn=fn,
        args=tuple(args),
        kwargs=dict(kwargs),
        spec=spec,
        info=info,
        env=runner._environment(),
        run_logger=get_run_logger(ctx),
        capture_context=lambda: run_context.capture(
            ctx, fn, plain_containers(dict(ctx.parameters or {}))
        ),
        submit_child=runner.submit,
        reuse=reuse,
        result_volume=ResultVolume.for_spec(volume, spec) if volume is not None else None,
    )


def _remote_function(
    fn: Callable[..., Any], spec: SandboxSpec, runner: ModalTaskRunner, reuse: bool = False
) -> Callable[..., Any]:
    """The stand-in for `fn` the engine calls: same signature (via `__wrapped__`),
    same sync/async nature; the body runs in a sandbox."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def call_in_sandbox_async(*args: Any, **kwargs: Any) -> Any:
            call = _call_for(fn, spec, runner, args, kwargs, reuse)
            try:
                return await asyncio.to_thread(call.run)
            except BaseException:  # asyncio cancellation: Prefect's timeout or shutdown
                call.cancel("interrupted")
                raise

        return call_in_sandbox_async

    @functools.wraps(fn)
    def call_in_sandbox(*args: Any, **kwargs: Any) -> Any:
        return _call_for(fn, spec, runner, args, kwargs, reuse).run()

    return call_in_sandbox


__all__ = ["DEFAULT_MAX_PARALLELISM", "ModalTaskRunner"]
