"""The worker's watcher: cancellation of running runs, and reconciliation after restarts.

Prefect's worker base class handles a Cancelling run only if it never started,
and otherwise waits up to 300 s for the run's own process to stop; a Modal
sandbox running Prefect's engine never stops by itself.  Nor does Prefect know,
after a worker restart, which sandboxes belong to which runs.  This module
closes both gaps, with the sandboxes' tags (flow run id, work pool id) and the
flow runs' ``infrastructure_pid`` (the sandbox id) as the only memory:

* every few seconds, runs this process watches that became Cancelling get their
  sandbox terminated and are marked Cancelled (`ModalWorker.cancel_in_flight`);
* at start and then periodically, a full pass (`Reconciler.reconcile_all`):

  - a sandbox whose run is gone, Cancelled or Cancelling is terminated (and the
    Cancelling run marked Cancelled);
  - a sandbox whose run is final (Completed / Failed / Crashed) for longer than
    `FINAL_GRACE_SECONDS` is terminated (the grace lets the engine flush logs);
  - a running sandbox of a non-final run that no live worker watches is adopted:
    followed to its end, its outcome recorded, exactly as if we had started it;
  - a non-final run whose sandbox has ended (or vanished) without the engine
    reporting a final state is marked Crashed with the exit code and the last
    output lines.

Nothing here ever creates a sandbox, so no run can get a second one from it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

import anyio
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType, WorkerStatus
from prefect.client.schemas.sorting import FlowRunSort

from prefect_modal import status as _status
from prefect_modal.core import tags
from prefect_modal.worker.inflight import InFlight

if TYPE_CHECKING:
    import anyio.abc
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import WorkPool
    from prefect.logging.loggers import LoggingAdapter, PrefectLogAdapter

    from prefect_modal.core.targets import Target
    from prefect_modal.worker.job_configuration import ModalWorkerJobConfiguration

#: How often in-flight runs are checked for cancellation.
WATCH_INTERVAL_SECONDS = 2.0
#: How often the full reconciliation pass runs (it lists sandboxes and runs).
FULL_INTERVAL_SECONDS = 30.0
#: How long a run may be final while its sandbox still runs before we terminate it
#: (documented with `status.FINAL_GRACE_SECONDS`, which `prefect-modal status` explains).
FINAL_GRACE_SECONDS = _status.FINAL_GRACE_SECONDS
#: Lines of output kept in a crash message.
CRASH_TAIL_LINES = 20

_ACTIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
# Prefect's console format: "12:00:01.123 | INFO    | logger - message".  Such
# lines are Prefect log records the engine already sent to the API.
_PREFECT_RECORD = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} \| ")
_CONTINUATION = re.compile(
    r"^(\s|Traceback \(most recent call last\)|During handling|The above exception|"
    r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|$)"
)


def redact(text: str, secret_values: Sequence[str]) -> str:
    for value in secret_values:
        if value:
            text = text.replace(value, "***")
    return text


def crash_message(
    sandbox_id: str,
    exit_code: int | None,
    tail: str,
    secret_values: Sequence[str] = (),
    timeout_s: int | None = None,
) -> str:
    """Why a run is Crashed: which sandbox, how it ended (a timeout with its limit),
    what it printed last."""
    if exit_code is None:
        how = "no longer exists (it ended and was cleaned up, or its server was restarted)"
    elif exit_code == 137:
        how = "was terminated (exit code 137: killed from outside, out of memory, or terminated)"
    elif exit_code == 124:
        limit = f" after {timeout_s} s" if timeout_s else ""
        how = f"timed out{limit} (exit code 124; raise the `timeout` job variable)"
    else:
        how = f"exited with code {exit_code}"
    lines = [line for line in tail.splitlines() if line.strip()][-CRASH_TAIL_LINES:]
    message = f"Modal sandbox {sandbox_id} {how} before the flow run reported a final state."
    if lines:
        message += " Last output lines:\n" + "\n".join(lines)
    return redact(message, secret_values)


class SandboxLogForwarder:
    """Sends a sandbox's output lines to the flow run's logs and the worker's log.

    Prefect's engine inside the sandbox already ships its own log records to
    the API and prints them on stderr; those lines (and their tracebacks) go to
    the worker's log only, so the flow run's logs do not show them twice.
    Everything else (prints, native libraries, crashes before logging started)
    reaches the flow run's logs, prefixed with the sandbox id.
    """

    def __init__(
        self,
        flow_run_logger: Any,
        worker_logger: logging.Logger | Any,
        sandbox_id: str,
        secret_values: Sequence[str],
        forward: bool = True,
    ) -> None:
        self.flow_run_logger = flow_run_logger
        self.worker_logger = worker_logger
        self.sandbox_id = sandbox_id
        self.secret_values = tuple(secret_values)
        self.forward = forward
        self._in_record: dict[str, bool] = {"stdout": False, "stderr": False}

    def on_line(self, stream: str, line: str) -> None:
        if not self.forward:
            return
        line = redact(line.rstrip("\r"), self.secret_values)
        if _PREFECT_RECORD.match(line):
            self._in_record[stream] = True
            self.worker_logger.info("[%s] %s", self.sandbox_id, line)
            return
        if self._in_record.get(stream) and _CONTINUATION.match(line):
            self.worker_logger.info("[%s] %s", self.sandbox_id, line)
            return
        self._in_record[stream] = False
        self.flow_run_logger.info("[sandbox %s %s] %s", self.sandbox_id, stream, line)


class WatchedWorker(Protocol):
    """What the watcher uses of its `ModalWorker`: a protocol, so that this module
    need not import the worker, which starts the watcher."""

    name: str
    backend_id: UUID | None
    reconcile_pool: bool
    in_flight: dict[UUID, InFlight]
    job_configuration: type[ModalWorkerJobConfiguration]
    _logger: logging.Logger | LoggingAdapter
    _work_pool: WorkPool | None
    _runs_task_group: anyio.abc.TaskGroup | None
    _submitting_flow_run_ids: set[UUID]

    @property
    def client(self) -> PrefectClient: ...

    @property
    def work_pool(self) -> WorkPool: ...

    def get_flow_run_logger(self, flow_run: FlowRun) -> PrefectLogAdapter: ...

    async def in_thread(self, fn: Any, *args: Any) -> Any: ...

    async def target_for(self, configuration: ModalWorkerJobConfiguration) -> Target: ...

    async def follow(self, entry: InFlight, flow_run: FlowRun, stream: bool) -> int: ...

    async def cancel_in_flight(self, entry: InFlight) -> None: ...

    async def mark_cancelled(self, flow_run_id: UUID, sandbox_id: str | None) -> None: ...

    async def _propose_crashed_state(
        self, flow_run: FlowRun, message: str, client: PrefectClient | None = None
    ) -> None: ...


class Reconciler:
    """The watcher loop of one `ModalWorker` (see the module docstring)."""

    def __init__(self, worker: WatchedWorker) -> None:
        self.worker = worker
        self.logger = worker._logger
        self._last_full = 0.0
        self._final_first_seen: dict[str, float] = {}

    async def loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            while self.worker._work_pool is None:  # the first sync gives us the pool
                await anyio.sleep(0.5)
            while True:
                try:
                    await self.watch_in_flight()
                    if (
                        self.worker.reconcile_pool
                        and time.monotonic() - self._last_full >= FULL_INTERVAL_SECONDS
                    ):
                        self._last_full = time.monotonic()
                        await self.reconcile_all()
                except Exception:
                    self.logger.warning("Sandbox reconciliation failed; retrying.", exc_info=True)
                await anyio.sleep(WATCH_INTERVAL_SECONDS)

    # -- cancellation of runs we watch -------------------------------------------

    async def watch_in_flight(self) -> None:
        entries = {
            e.flow_run_id: e
            for e in list(self.worker.in_flight.values())
            if e.sandbox_id and not e.cancel_started
        }
        if not entries:
            return
        runs = await self._read_runs(FlowRunFilter(id=FlowRunFilterId(any_=list(entries))))
        for run in runs:
            state, entry = run.state, entries[run.id]
            if state is None:
                continue
            if state.type in (StateType.CANCELLING, StateType.CANCELLED):
                self._start(self.worker.cancel_in_flight, entry)
            elif state.is_final():
                # The engine reported the end but its sandbox lingers (a stuck
                # non-daemon thread, a child process): reap it after a grace.
                first = self._final_first_seen.setdefault(entry.sandbox_id or "", time.monotonic())
                if time.monotonic() - first >= FINAL_GRACE_SECONDS and entry.sandbox is not None:
                    from prefect_modal.core import modal_api

                    self.logger.info(
                        "Terminating sandbox %s: its flow run %s is %s since %.0f s.",
                        entry.sandbox_id,
                        run.id,
                        state.name,
                        FINAL_GRACE_SECONDS,
                    )
                    entry.reaped = True
                    await self.worker.in_thread(modal_api.terminate, entry.sandbox)
                    self._final_first_seen.pop(entry.sandbox_id or "", None)

    async def _read_runs(self, flow_run_filter: FlowRunFilter, **filters: Any) -> list[FlowRun]:
        # Prefect 3.8's client sends null sort/limit when not given, which its
        # own server refuses: always pass them.
        return await self.worker.client.read_flow_runs(
            flow_run_filter=flow_run_filter, sort=FlowRunSort.ID_DESC, limit=200, **filters
        )

    def _start(self, fn: Any, *args: Any) -> None:
        group = self.worker._runs_task_group
        if group is not None:
            group.start_soon(fn, *args)

    # -- the full pass -------------------------------------------------------------

    async def reconcile_all(self) -> None:
        worker = self.worker
        pool = worker.work_pool
        handled: set[UUID] = set()
        pool_config = await self._pool_configuration()
        if pool_config is not None and self._target_known(pool_config):
            target = await worker.target_for(pool_config)
            handled |= await self._reconcile_sandboxes(pool_config, target, str(pool.id))
        await self._reconcile_runs(pool.name, skip=handled)

    async def _pool_configuration(self) -> ModalWorkerJobConfiguration | None:
        try:
            return await self.worker.job_configuration.from_template_and_values(
                base_job_template=self.worker.work_pool.base_job_template,
                values={},
                client=self.worker.client,
            )
        except Exception:
            self.logger.debug("The pool's default job configuration is invalid", exc_info=True)
            return None

    @staticmethod
    def _target_known(config: ModalWorkerJobConfiguration) -> bool:
        """False when resolving a target would start a fresh in-process local server:
        such a server has no sandboxes from before, so there is nothing to list."""
        from prefect_modal.core import targets
        from prefect_modal.core.credentials import ambient_credentials_present

        creds = config.modal_credentials
        if targets.requested_target() == "modal" or (creds and creds.has_token):
            return True
        return ambient_credentials_present() or targets.local_server() is not None

    async def _reconcile_sandboxes(
        self, config: ModalWorkerJobConfiguration, target: Target, pool_id: str
    ) -> set[UUID]:
        """Sandboxes tagged with this pool, against their runs' states."""
        from prefect_modal.core import modal_api

        spec = config.spec
        found = await self.worker.in_thread(
            modal_api.list_in_app,
            spec.effective_app_name,
            {tags.WORK_POOL: pool_id, tags.ROLE: tags.ROLE_FLOW_RUN},
            target.client,
            spec.modal_environment,
        )
        by_run: dict[UUID, Any] = {}
        for sandbox in found:
            found_tags = await self.worker.in_thread(modal_api.sandbox_tags, sandbox)
            try:
                run_id = UUID(found_tags.get(tags.FLOW_RUN, ""))
            except ValueError:
                continue
            if run_id not in self.worker.in_flight:
                by_run[run_id] = sandbox
        if not by_run:
            return set()
        runs = {
            r.id: r
            for r in await self._read_runs(FlowRunFilter(id=FlowRunFilterId(any_=list(by_run))))
        }
        for run_id, sandbox in by_run.items():
            await self._settle(run_id, runs.get(run_id), sandbox, target)
        return set(by_run)

    async def _settle(
        self, run_id: UUID, run: FlowRun | None, sandbox: Any, target: Target
    ) -> None:
        """Decide what one running sandbox of ours should become."""
        from prefect_modal.core import modal_api

        sandbox_id = modal_api.sandbox_id(sandbox)
        state = run.state if run is not None else None
        if run is None or state is None or state.type == StateType.CANCELLED:
            self.logger.info(
                "Terminating sandbox %s: its flow run %s is gone or cancelled.", sandbox_id, run_id
            )
            await self.worker.in_thread(modal_api.terminate, sandbox)
            return
        if state.type == StateType.CANCELLING:
            await self.worker.in_thread(modal_api.terminate, sandbox)
            await self.worker.mark_cancelled(run_id, sandbox_id)
            return
        if state.is_final():
            first = self._final_first_seen.setdefault(sandbox_id, time.monotonic())
            if time.monotonic() - first >= FINAL_GRACE_SECONDS:
                self.logger.info(
                    "Terminating sandbox %s: its flow run %s is %s.", sandbox_id, run_id, state.name
                )
                await self.worker.in_thread(modal_api.terminate, sandbox)
                self._final_first_seen.pop(sandbox_id, None)
            return
        if await self._may_adopt(run):
            await self._adopt(run, sandbox, target)

    async def _reconcile_runs(self, pool_name: str, skip: set[UUID]) -> None:
        """Active runs of this pool that name a sandbox nobody here watches."""
        from prefect_modal.core import modal_api

        runs = await self._read_runs(
            FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE_STATES))
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool_name])),
        )
        for run in runs:
            pid = run.infrastructure_pid or ""
            if (
                not pid.startswith("sb-")
                or run.id in skip
                or run.id in self.worker.in_flight
                or run.id in self.worker._submitting_flow_run_ids
            ):
                continue
            if not await self._may_adopt(run):
                continue
            config = await self._run_configuration(run)
            if config is None:
                continue
            target = await self.worker.target_for(config)
            try:
                sandbox = await self.worker.in_thread(modal_api.from_id, pid, target.client)
                exit_code = await self.worker.in_thread(modal_api.poll, sandbox)
            except modal_api.NotFoundError:
                sandbox, exit_code = None, None
            if sandbox is not None and exit_code is None:
                await self._adopt(run, sandbox, target, config)
                continue
            tail = ""
            if sandbox is not None:
                with anyio.move_on_after(10):
                    tail = await self.worker.in_thread(modal_api.read_output_tail, sandbox)
            await self._crash_if_unfinished(run.id, pid, exit_code, tail)

    async def _crash_if_unfinished(
        self, run_id: UUID, sandbox_id: str, exit_code: int | None, tail: str
    ) -> None:
        run = await self.worker.client.read_flow_run(run_id)  # fresh: it may just have finished
        if run.state is None or run.state.is_final():
            return
        if run.state.type == StateType.CANCELLING:
            await self.worker.mark_cancelled(run_id, sandbox_id)
            return
        message = crash_message(sandbox_id, exit_code, tail)
        self.logger.info("Flow run %s: %s", run_id, message.splitlines()[0])
        await self.worker._propose_crashed_state(run, message)

    async def _run_configuration(self, run: FlowRun) -> ModalWorkerJobConfiguration | None:
        try:
            return await self.worker.job_configuration.resolve_for_flow_run(
                run,
                client=self.worker.client,
                work_pool=self.worker.work_pool,
                worker_name=self.worker.name,
                worker_id=self.worker.backend_id,
            )
        except Exception:
            self.logger.warning("Cannot rebuild the job configuration of %s", run.id, exc_info=True)
            return None

    async def _may_adopt(self, run: FlowRun) -> bool:
        """Only orphans: runs started by this worker (same name, restarted) or by a
        worker that is no longer online.  Two live workers never watch one run."""
        owner = (run.labels or {}).get("prefect.worker.name")
        if not owner or owner == self.worker.name:
            return True
        try:
            workers = await self.worker.client.read_workers_for_work_pool(
                work_pool_name=self.worker.work_pool.name
            )
        except Exception:
            return False
        return not any(w.name == owner and w.status == WorkerStatus.ONLINE for w in workers)

    async def _adopt(
        self,
        run: FlowRun,
        sandbox: Any,
        target: Target,
        config: ModalWorkerJobConfiguration | None = None,
    ) -> None:
        from prefect_modal.core import modal_api

        if run.id in self.worker.in_flight:
            return
        config = config or await self._run_configuration(run)
        entry: InFlight = InFlight(
            flow_run_id=run.id,
            configuration=config,
            target=target,
            sandbox=sandbox,
            sandbox_id=modal_api.sandbox_id(sandbox),
            adopted=True,
        )
        self.worker.in_flight[run.id] = entry
        if run.infrastructure_pid != entry.sandbox_id:
            await self.worker.client.update_flow_run(run.id, infrastructure_pid=entry.sandbox_id)
        self.worker.get_flow_run_logger(run).info(
            "Worker %r adopted running sandbox %s of this flow run.",
            self.worker.name,
            entry.sandbox_id,
        )
        self._start(self._follow_adopted, entry, run)

    async def _follow_adopted(self, entry: InFlight, run: FlowRun) -> None:
        try:
            await self.worker.follow(entry, run, stream=False)
        except Exception:
            self.logger.warning("Lost track of adopted sandbox %s", entry.sandbox_id, exc_info=True)
        finally:
            entry.finished.set()
            self.worker.in_flight.pop(run.id, None)
