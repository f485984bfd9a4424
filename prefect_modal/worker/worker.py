"""`ModalWorker`: a Prefect worker of type ``modal`` that runs each flow run in a Modal Sandbox.

Start one with::

    prefect work-pool create my-pool --type modal
    prefect worker start --pool my-pool

It is the open counterpart of Prefect Cloud's ``modal:push`` pool and the
Prefect form of ZenML's Modal orchestrator.  The job configuration (whose fields
are the work pool's job variables) is in `job_configuration.py`, what the worker
knows of a run it watches in `inflight.py`.  The watcher that finds sandboxes
again after a restart and enforces cancellation lives in `reconcile.py`.

Two modes, chosen by the ``mode`` job variable:

* ``pipeline`` (default): the whole flow run runs in one sandbox, started with
  Prefect's own engine command (``python -m prefect.engine``), which runs the
  deployment's pull steps inside the sandbox exactly as any Prefect worker's
  infrastructure does.
* ``per_step``: the flow run still starts in one (light) sandbox, but through
  ``python -m prefect_modal.per_step``, which loads the flow, replaces its task
  runner with `ModalTaskRunner` (Prefect's supported ``flow.with_options``),
  and runs it; each task call then gets its own sandbox with the pool's
  resources.  See `prefect_modal/per_step.py` for why it is done that way.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
import anyio.to_thread
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseWorker, BaseWorkerResult

from prefect_modal.core.spec import SandboxSpec
from prefect_modal.worker.inflight import InFlight
from prefect_modal.worker.job_configuration import (
    DEFAULT_CANCEL_GRACE_SECONDS,
    ENV_MAX_PARALLELISM,
    ENV_MODE,
    ENV_TASK_ENV_NAMES,
    ENV_TASK_SPEC,
    ENV_TASK_SPECS,
    IMAGE_FIELDS,
    PER_STEP_COMMAND,
    PIPELINE_COMMAND,
    ROLE_FLOW,
    SPEC_FIELDS,
    TAG_DEPLOYMENT,
    TAG_FLOW_RUN,
    TAG_MODE,
    TAG_ROLE,
    TAG_WORK_POOL,
    TAG_WORKER,
    ModalWorkerJobConfiguration,
    is_secret_env,
    sandbox_name_for,
    split_env,
)

if TYPE_CHECKING:
    from prefect_modal.core.targets import Target
    from prefect_modal.worker.reconcile import Reconciler

__all__ = [
    "DEFAULT_CANCEL_GRACE_SECONDS",
    "ENV_MAX_PARALLELISM",
    "ENV_MODE",
    "ENV_TASK_ENV_NAMES",
    "ENV_TASK_SPEC",
    "ENV_TASK_SPECS",
    "IMAGE_FIELDS",
    "PER_STEP_COMMAND",
    "PIPELINE_COMMAND",
    "ROLE_FLOW",
    "SPEC_FIELDS",
    "TAG_DEPLOYMENT",
    "TAG_FLOW_RUN",
    "TAG_MODE",
    "TAG_ROLE",
    "TAG_WORKER",
    "TAG_WORK_POOL",
    "InFlight",
    "ModalWorker",
    "ModalWorkerJobConfiguration",
    "ModalWorkerResult",
    "is_secret_env",
    "sandbox_name_for",
    "split_env",
]


class ModalWorkerResult(BaseWorkerResult):
    """The flow run's sandbox ended: its id and exit code."""


class ModalWorker(BaseWorker[ModalWorkerJobConfiguration, Any, ModalWorkerResult]):
    """Prefect worker that runs each flow run in a Modal Sandbox."""

    type = "modal"
    job_configuration = ModalWorkerJobConfiguration
    _description = (
        "Run each flow run in a Modal Sandbox (serverless CPUs and GPUs), whole (pipeline mode) "
        "or with each task in its own sandbox (per_step mode). Works with Modal's cloud or the "
        "local Modal-compatible server of prefect-modal."
    )
    _display_name = "Modal"
    _documentation_url = "https://github.com/prefect-modal/prefect-modal#worker"
    _logo_url = "https://modal.com/assets/favicon.svg"

    def __init__(self, *args: Any, reconcile_pool: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: False for the in-process worker of an ad-hoc call (`@modal`): it watches
        #: only its own runs, never adopts or reaps other sandboxes of the pool.
        self.reconcile_pool = reconcile_pool
        #: Bytes to write to a new sandbox's stdin (an ad-hoc run's bundle), by run id.
        self.stdin_payloads: dict[UUID, bytes] = {}
        self.in_flight: dict[UUID, InFlight] = {}
        self._reconciler: Reconciler | None = None
        self._reconcile_scope: anyio.CancelScope | None = None
        # Threads that wait on sandboxes: one per in-flight run, so they get
        # their own limiter instead of starving anyio's default pool of 40.
        self._wait_limiter = anyio.CapacityLimiter(10_000)

    # -- lifecycle ----------------------------------------------------------------

    async def setup(self) -> None:
        await super().setup()
        from prefect_modal.worker.reconcile import Reconciler

        self._reconciler = Reconciler(self)
        self._reconcile_scope = anyio.CancelScope()
        assert self._runs_task_group is not None
        self._runs_task_group.start_soon(self._reconciler.loop, self._reconcile_scope)

    async def teardown(self, *exc_info: Any) -> None:
        if self._reconcile_scope is not None:
            self._reconcile_scope.cancel()
        await super().teardown(*exc_info)

    # -- Modal connection ---------------------------------------------------------

    async def target_for(self, configuration: ModalWorkerJobConfiguration) -> Target:
        """The Modal this run's sandbox lives on (cached per credentials by `targets`)."""
        from prefect_modal.core.targets import resolve_target

        return await anyio.to_thread.run_sync(resolve_target, configuration.modal_credentials)

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        """Run a blocking Modal call without blocking the worker's event loop."""
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self._wait_limiter, abandon_on_cancel=True
        )

    # -- ad-hoc runs (`@modal`, `worker.submit`) ----------------------------------

    async def _submit_adhoc_run(  # type: ignore[override]
        self,
        flow: Any,
        parameters: dict[str, Any] | None = None,
        job_variables: dict[str, Any] | None = None,
        task_status: anyio.abc.TaskStatus[FlowRun] | None = None,
        flow_run: FlowRun | None = None,
    ) -> None:
        """Run a called flow in one sandbox; the bundle goes in on stdin when the
        pool has no bundle storage (see `adhoc.py`)."""
        from prefect_modal.worker.adhoc import submit_adhoc_run

        await submit_adhoc_run(self, flow, parameters, job_variables, task_status, flow_run)

    # -- run ----------------------------------------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ModalWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> ModalWorkerResult:
        """Start (or find) the flow run's sandbox, report its id, follow it to its end."""
        from prefect_modal.core import modal_api

        logger = self.get_flow_run_logger(flow_run)
        entry = self.in_flight.get(flow_run.id)
        if entry is not None and entry.sandbox_id:
            # Submitted again while we watch it: report the same sandbox, start nothing.
            if task_status:
                task_status.started(entry.sandbox_id)
            await entry.finished.wait()
            return ModalWorkerResult(identifier=entry.sandbox_id, status_code=entry.exit_code or 0)
        entry = InFlight(flow_run_id=flow_run.id, configuration=configuration)
        self.in_flight[flow_run.id] = entry
        try:
            target = await self.target_for(configuration)
            entry.target = target
            spec = configuration.sandbox_spec()
            plain, secret = configuration.sandbox_env(target.env)
            entry.secret_values = tuple(v for v in secret.values() if len(v) >= 6)
            sandbox, created = await self.in_thread(
                self._find_or_create,
                flow_run,
                configuration,
                spec,
                target,
                plain,
                secret,
                logger.info,
            )
            entry.sandbox = sandbox
            entry.sandbox_id = modal_api.sandbox_id(sandbox)
            payload = self.stdin_payloads.pop(flow_run.id, None)
            if payload is not None and created:
                await self.in_thread(modal_api.send_stdin, sandbox, payload)
            logger.info(
                "%s Modal sandbox %s (%s) in app %r on %s; see: %s",
                "Started" if created else "Found running",
                entry.sandbox_id,
                configuration.name,
                spec.effective_app_name,
                target.kind,
                modal_api.dashboard_url(
                    entry.sandbox_id, spec.effective_app_name, target.server_url
                ),
            )
            if task_status:
                task_status.started(entry.sandbox_id)
            self._start_events(entry, flow_run, created)
            await self._write_artifact(entry, flow_run.id, "running")
            exit_code = await self.follow(entry, flow_run, stream=configuration.stream_output)
            return ModalWorkerResult(identifier=entry.sandbox_id, status_code=exit_code)
        finally:
            entry.finished.set()
            self.in_flight.pop(flow_run.id, None)

    def _find_or_create(
        self,
        flow_run: FlowRun,
        configuration: ModalWorkerJobConfiguration,
        spec: SandboxSpec,
        target: Target,
        plain: dict[str, str],
        secret: dict[str, str],
        log: Callable[[str], None] | None = None,
    ) -> tuple[Any, bool]:
        """The run's running sandbox if there is one, else a new one: never two."""
        from prefect_modal.core import modal_api

        name = configuration.name or sandbox_name_for(None, flow_run.id)
        found = modal_api.list_in_app(
            spec.effective_app_name,
            {TAG_FLOW_RUN: str(flow_run.id), TAG_ROLE: ROLE_FLOW},
            target.client,
            spec.modal_environment,
        )
        if found:
            return found[0], False
        assert configuration.command
        try:
            sandbox = modal_api.create_sandbox(
                spec,
                ["/bin/sh", "-c", configuration.command]
                if _needs_shell(configuration.command)
                else shlex.split(configuration.command),
                client=target.client,
                name=name,
                tags=configuration.sandbox_tags(flow_run),
                extra_env=plain,
                extra_secret_env=secret,
                log=log,  # a first image build can take a minute: say so in the run's log
            )
        except modal_api.AlreadyExistsError:
            existing = modal_api.from_name(
                spec.effective_app_name, name, target.client, spec.modal_environment
            )
            if existing is None:
                raise
            tags = modal_api.sandbox_tags(existing)
            if tags.get(TAG_FLOW_RUN) != str(flow_run.id):
                raise RuntimeError(
                    f"A sandbox named {name!r} is running for another flow run "
                    f"({tags.get(TAG_FLOW_RUN) or 'unknown'}); change the `name` job variable "
                    "template so it includes {{ ctx.flow_run.id }}."
                ) from None
            return existing, False
        return sandbox, True

    async def follow(self, entry: InFlight, flow_run: FlowRun, stream: bool) -> int:
        """Stream the sandbox's output (if asked), wait for its end, record the outcome."""
        from prefect_modal.core import modal_api
        from prefect_modal.worker.reconcile import SandboxLogForwarder, crash_message

        logger = self.get_flow_run_logger(flow_run)
        entry.tail = modal_api.OutputTail()
        # Always follow the output, if only to keep the tail for a crash message.
        forwarder = SandboxLogForwarder(
            flow_run_logger=logger,
            worker_logger=self._logger,
            sandbox_id=entry.sandbox_id or "",
            secret_values=entry.secret_values,
            # An adopted sandbox's earlier lines were forwarded by the worker
            # that started it; keep only the tail, for a crash message.
            forward=stream and not entry.adopted,
        )
        threads = modal_api.stream_output(entry.sandbox, forwarder.on_line, entry.tail)
        code = await self.in_thread(modal_api.wait_returncode, entry.sandbox)
        exit_code = -1 if code is None else int(code)
        for thread in threads:
            await self.in_thread(thread.join, 5)
        if entry.cancel_started:
            with anyio.move_on_after(30):
                await entry.cancel_done.wait()
        status = "succeeded" if exit_code == 0 else "failed"
        if entry.cancelled_by_worker or entry.reaped:
            status = "terminated"
        elif exit_code != 0:
            state = await self._current_state(flow_run.id)
            if exit_code == 124:
                status = "timeout"
            elif state is not None and not state.is_final():
                status = "crashed"
            if state is not None and not state.is_final():
                # Crashed with the reason: a timeout names its limit, else the exit
                # code and the last lines (Prefect's own would say only "non-zero").
                timeout_s = entry.configuration.spec.timeout if entry.configuration else None
                await self._propose_crashed_state(
                    flow_run,
                    crash_message(
                        entry.sandbox_id or "",
                        exit_code,
                        entry.tail.text(),
                        entry.secret_values,
                        timeout_s=timeout_s,
                    ),
                )
        record = await self._write_artifact(entry, flow_run.id, status, exit_code)
        self._end_events(entry, flow_run, status, exit_code, record)
        entry.exit_code = exit_code
        # A sandbox we reaped after its run ended did its job: no crash to report.
        return 0 if entry.reaped else exit_code

    async def _current_state(self, flow_run_id: UUID) -> Any:
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except Exception:
            return None
        return run.state

    def _events_of(self, entry: InFlight, flow_run: FlowRun) -> Any:
        """The sandbox's events, related to the flow run, its flow, deployment and pool."""
        from prefect_modal import events

        if entry.events is None:
            record = self._record(entry, flow_run.id, "running")
            if record is None:
                return None
            pool = self._work_pool
            related = events.related_resources(
                flow_run_id=flow_run.id,
                flow_id=flow_run.flow_id,
                deployment_id=flow_run.deployment_id,
                work_pool_id=pool.id if pool is not None else None,
                names={
                    "flow-run": flow_run.name,
                    "work-pool": pool.name if pool is not None else None,
                },
            )
            entry.events = events.for_record(record, related=related)
        return entry.events

    def _start_events(self, entry: InFlight, flow_run: FlowRun, created: bool) -> None:
        sandbox_events = self._events_of(entry, flow_run)
        if sandbox_events is None:
            return
        if created:
            sandbox_events.created()
        sandbox_events.running()

    def _end_events(
        self,
        entry: InFlight,
        flow_run: FlowRun,
        status: str,
        exit_code: int,
        record: Any,
    ) -> None:
        from prefect_modal import events

        sandbox_events = self._events_of(entry, flow_run)
        if sandbox_events is None:
            return
        if entry.cancelled_by_worker or entry.reaped:
            sandbox_events.terminated(
                "its flow run was cancelled"
                if entry.cancelled_by_worker
                else "its flow run had ended and the sandbox lingered"
            )
        sandbox_events.exited(
            exit_code,
            events.exit_reason(status, exit_code),
            record.seconds if record is not None else None,
            record.estimated_cost() if record is not None else None,
        )

    def _record(
        self, entry: InFlight, flow_run_id: UUID, status: str, exit_code: int | None = None
    ) -> Any:
        """The sandbox's record (id, app, resources, image, link), or None before it exists."""
        from prefect_modal.core import modal_api
        from prefect_modal.core.artifacts import SandboxArtifact

        config, target = entry.configuration, entry.target
        if config is None or target is None or not entry.sandbox_id:
            return None
        spec = config.sandbox_spec()
        resources_summary = spec.describe()
        if config.mode == "per_step" and config.spec.gpu_config:
            resources_summary["task_gpu"] = config.spec.gpu_config
        record = SandboxArtifact(
            sandbox_id=entry.sandbox_id,
            sandbox_name=config.name,
            app_name=spec.effective_app_name,
            target=target.kind,
            flow_run_id=flow_run_id,
            mode=config.mode,
            resources=resources_summary,
            status=status,  # type: ignore[arg-type]
            exit_code=exit_code,
            started_at=entry.started_at,
            ended_at=datetime.now(timezone.utc) if exit_code is not None else None,
            link=modal_api.dashboard_url(
                entry.sandbox_id, spec.effective_app_name, target.server_url
            ),
        )
        return record

    async def _write_artifact(
        self, entry: InFlight, flow_run_id: UUID, status: str, exit_code: int | None = None
    ) -> Any:
        """Record the sandbox on the flow run, and its line in the run's sandbox table.

        Never fails the run: the record is for people, the sandbox is what matters.
        """
        from prefect_modal.core.artifacts import write_flow_summary, write_sandbox_artifact

        record = self._record(entry, flow_run_id, status, exit_code)
        if record is None:
            return None
        try:
            await anyio.to_thread.run_sync(write_sandbox_artifact, record)
            if exit_code is not None and record.mode == "pipeline":
                # per_step runs get theirs from the runner in the flow's sandbox.
                await anyio.to_thread.run_sync(write_flow_summary, flow_run_id, [record])
        except Exception:
            self._logger.warning(
                "Could not write the sandbox artifact of %s", flow_run_id, exc_info=True
            )
        return record

    # -- cancellation -------------------------------------------------------------

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: ModalWorkerJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Terminate the sandbox with this id (Modal's terminate is immediate)."""
        from prefect_modal.core import modal_api

        for entry in self.in_flight.values():
            if entry.sandbox_id == infrastructure_pid:
                entry.cancelled_by_worker = True
        target = await self.target_for(configuration)
        if not await self.in_thread(modal_api.terminate_by_id, infrastructure_pid, target.client):
            raise InfrastructureNotFound(f"Modal sandbox {infrastructure_pid!r} not found.")

    async def _cancel_run(self, flow_run_id: UUID) -> None:  # type: ignore[override]
        """Prefect's hook for a Cancelling event: it only handles runs that have not
        started, so running runs we watch are cancelled here, at once."""
        entry = self.in_flight.get(flow_run_id)
        if entry is not None and entry.sandbox_id:
            await self.cancel_in_flight(entry)
            return
        await super()._cancel_run(flow_run_id)

    async def cancel_in_flight(self, entry: InFlight) -> None:
        """Give a self-cancelling command its grace period, then terminate and mark Cancelled."""
        from prefect_modal.core import modal_api

        if entry.cancel_started:
            return
        entry.cancel_started = True
        try:
            config = entry.configuration
            grace = config.cancel_grace_seconds if config and config.is_using_a_runner else 0
            with anyio.move_on_after(grace):
                await entry.finished.wait()
            if not entry.finished.is_set() and entry.sandbox is not None:
                entry.cancelled_by_worker = True
                await self.in_thread(modal_api.terminate, entry.sandbox)
                self._logger.info(
                    "Terminated sandbox %s of cancelled flow run %s",
                    entry.sandbox_id,
                    entry.flow_run_id,
                )
            await self.mark_cancelled(entry.flow_run_id, entry.sandbox_id)
        finally:
            entry.cancel_done.set()

    async def mark_cancelled(self, flow_run_id: UUID, sandbox_id: str | None) -> None:
        try:
            flow_run = await self.client.read_flow_run(flow_run_id)
        except Exception:
            return
        if flow_run.state is not None and flow_run.state.is_final():
            return
        await self._mark_flow_run_as_cancelled(
            flow_run,
            state_updates={
                "message": f"Flow run cancelled; Modal sandbox {sandbox_id} terminated."
            },
        )
        self.get_flow_run_logger(flow_run).info(
            "Cancelled flow run %s: its sandbox %s was terminated.", flow_run_id, sandbox_id
        )


def _needs_shell(command: str) -> bool:
    """Run through /bin/sh only when the command uses shell syntax."""
    return any(ch in command for ch in "|&;<>()$`\"'*?~")
