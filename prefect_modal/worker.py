"""`ModalWorker`: a Prefect worker of type ``modal`` that runs each flow run in a Modal Sandbox.

Start one with::

    prefect work-pool create my-pool --type modal
    prefect worker start --pool my-pool

It is the open counterpart of Prefect Cloud's ``modal:push`` pool and the
Prefect form of ZenML's Modal orchestrator.  Like prefect-docker's worker, this
file holds the job configuration (whose fields are the work pool's job
variables), the result type and the worker.  The watcher that finds sandboxes
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

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import anyio
import anyio.abc
import anyio.to_thread
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseJobConfiguration, BaseWorker, BaseWorkerResult
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from prefect_modal import resources, tags
from prefect_modal.credentials import ModalCredentials
from prefect_modal.packages import dependency_pins, missing_pins, requirement_name
from prefect_modal.settings import SandboxSpec, name_the_value

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

    from prefect_modal.reconcile import Reconciler
    from prefect_modal.targets import Target

#: The SandboxSpec fields that are job variables one to one.
SPEC_FIELDS: tuple[str, ...] = tuple(name for name in SandboxSpec.model_fields if name != "env")

#: Spec fields that describe the image; ZenML refuses per-step Docker settings in
#: its pipeline mode for the same reason we refuse per-task ones: one sandbox
#: runs every task, so there is no per-task image to apply them to.
IMAGE_FIELDS = (
    "image",
    "registry_secret",
    "python_version",
    "pip_packages",
    "local_python_sources",
)

#: Tag names on every sandbox the worker starts: how it is found again.
TAG_FLOW_RUN = tags.FLOW_RUN
TAG_DEPLOYMENT = tags.DEPLOYMENT
TAG_WORK_POOL = tags.WORK_POOL
TAG_WORKER = tags.WORKER
TAG_ROLE = tags.ROLE
TAG_MODE = tags.MODE
ROLE_FLOW = "flow-run"

PIPELINE_COMMAND = "python -m prefect.engine"
PER_STEP_COMMAND = "python -m prefect_modal.per_step"

#: Environment variables the per_step entry point reads (set by the worker).
ENV_MODE = "PREFECT_MODAL_MODE"
ENV_TASK_SPEC = "PREFECT_MODAL_TASK_SPEC"
ENV_TASK_ENV_NAMES = "PREFECT_MODAL_TASK_ENV_NAMES"
ENV_MAX_PARALLELISM = "PREFECT_MODAL_MAX_PARALLELISM"
ENV_TASK_SPECS = "PREFECT_MODAL_TASK_SPECS"

DEFAULT_CANCEL_GRACE_SECONDS = 5
_MAX_NAME = 64  # Modal's limit on object names
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# Prefect settings whose values are credentials but whose names do not look
# like it (`resources.is_secret_env_name` catches *_KEY, *_SECRET, ...).
_PREFECT_SECRET_NAMES = frozenset(
    {
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    }
)
_URL_WITH_PASSWORD = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]+:[^/@\s]+@")


def is_secret_env(name: str, value: str) -> bool:
    """True when a variable must reach the sandbox as a `modal.Secret`, never plain env.

    By name (the foundation's rule plus Prefect's own credential settings) and by
    value: a URL with a password in it is a credential whatever it is called.
    """
    return (
        resources.is_secret_env_name(name)
        or name.upper() in _PREFECT_SECRET_NAMES
        or bool(_URL_WITH_PASSWORD.match(value))
    )


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret) halves of the flow run's environment."""
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, value in env.items():
        (secret if is_secret_env(name, value) else plain)[name] = value
    return plain, secret


def sandbox_name_for(rendered: str | None, flow_run_id: UUID | str) -> str:
    """A Modal-safe sandbox name that always contains the flow run id.

    The name is what makes a second submission of the same run find the first
    sandbox instead of starting another, so a template without the run id (e.g.
    only the flow's name) still gets it appended.
    """
    run_id = str(flow_run_id)
    base = _NAME_UNSAFE.sub("-", rendered or "").strip("-.") if rendered else ""
    if not base:
        return f"prefect-{run_id}"
    if run_id in base and len(base) <= _MAX_NAME:
        return base
    base = base.replace(run_id, "").strip("-.")
    return f"{base[: _MAX_NAME - len(run_id) - 1].rstrip('-.')}-{run_id}".lstrip("-.")


def _is_self(pin: str) -> bool:
    """prefect-modal's own pin (it is not on PyPI; it goes in as local source)."""
    return requirement_name(pin) == "prefect-modal"


class ModalWorkerJobConfiguration(BaseJobConfiguration):
    """What the worker needs to start one flow run's sandbox.

    Its fields are the work pool's job variables (a superset of Prefect Cloud's
    ``modal:push`` template): every `SandboxSpec` field, the run `mode`, output
    streaming, the cancellation grace period and the Modal credentials.  A
    deployment's ``job_variables`` override the pool's values field by field,
    and ``env`` key by key, as with every Prefect worker.  Validation applies
    every `SandboxSpec` rule, so a bad value fails the submission, naming the
    job variable, before any sandbox exists.
    """

    name: str | None = Field(
        default=None,
        title="Sandbox name",
        description=(
            "Name template of the flow run's sandbox; supports {{ ctx.flow_run.* }} and "
            "{{ ctx.flow.* }}. The flow run id is appended when the template lacks it, so a "
            "resubmitted run finds its sandbox. Default: 'prefect-<flow run id>'."
        ),
    )
    command: str | None = Field(
        default=None,
        description=(
            "Command run in the sandbox. Leave empty for Prefect's engine "
            f"('{PIPELINE_COMMAND}'; '{PER_STEP_COMMAND}' in per_step mode). "
            "Set 'prefect flow-run execute' to have Prefect's supervisor handle "
            "cancellation inside the sandbox (it gets `cancel_grace_seconds` to do so)."
        ),
    )
    mode: Literal["pipeline", "per_step"] = Field(
        default="pipeline",
        description=(
            "pipeline: the whole flow run in one sandbox. per_step: the flow run in a light "
            "sandbox and each task call in its own sandbox (ModalTaskRunner) with these resources."
        ),
    )
    max_parallelism: int | None = Field(
        default=None,
        description=(
            "per_step mode: at most this many task sandboxes at once (default: the runner's)."
        ),
    )
    task_specs: dict[str, dict[str, Any]] | None = Field(
        default=None,
        title="Per-task sandbox settings",
        description=(
            "per_step mode only: task name -> sandbox settings (any of the fields above, e.g. "
            "{'train': {'gpu': 'A100', 'image': 'my/img:1'}}) laid over the pool's for that task."
        ),
    )
    # -- SandboxSpec fields, described as in SandboxSpec -------------------------
    gpu: str | None = Field(default=None, description=SandboxSpec.model_fields["gpu"].description)
    gpu_count: int | None = Field(
        default=None, description=SandboxSpec.model_fields["gpu_count"].description
    )
    cpu: float | None = Field(default=None, description=SandboxSpec.model_fields["cpu"].description)
    memory: int | str | None = Field(
        default=None, description=SandboxSpec.model_fields["memory"].description
    )
    timeout: int | None = Field(
        default=None, description=SandboxSpec.model_fields["timeout"].description
    )
    idle_timeout: int | None = Field(
        default=None, description=SandboxSpec.model_fields["idle_timeout"].description
    )
    region: list[str] | str | None = Field(
        default=None, description=SandboxSpec.model_fields["region"].description
    )
    cloud: str | None = Field(
        default=None, description=SandboxSpec.model_fields["cloud"].description
    )
    image: str | None = Field(
        default=None,
        description=(
            "Container image from a registry; it must have Python and prefect installed "
            "(and prefect-modal for per_step mode). Default: Modal's debian_slim with this "
            "Python and the same prefect version installed."
        ),
    )
    registry_secret: str | None = Field(
        default=None, description=SandboxSpec.model_fields["registry_secret"].description
    )
    python_version: str | None = Field(
        default=None, description=SandboxSpec.model_fields["python_version"].description
    )
    pip_packages: list[str] | None = Field(
        default=None, description=SandboxSpec.model_fields["pip_packages"].description
    )
    local_python_sources: list[str] | None = Field(
        default=None, description=SandboxSpec.model_fields["local_python_sources"].description
    )
    auto_packages: bool | None = Field(
        default=None, description=SandboxSpec.model_fields["auto_packages"].description
    )
    secrets: list[str] | None = Field(
        default=None, description=SandboxSpec.model_fields["secrets"].description
    )
    app_name: str | None = Field(
        default=None, description=SandboxSpec.model_fields["app_name"].description
    )
    modal_environment: str | None = Field(
        default=None, description=SandboxSpec.model_fields["modal_environment"].description
    )
    volumes: dict[str, str] | None = Field(
        default=None, description=SandboxSpec.model_fields["volumes"].description
    )
    workdir: str | None = Field(
        default=None, description=SandboxSpec.model_fields["workdir"].description
    )
    # -- worker behaviour ---------------------------------------------------------
    stream_output: bool = Field(
        default=True,
        description="Stream the sandbox's output into the worker's log and the flow run's logs.",
    )
    cancel_grace_seconds: int = Field(
        default=DEFAULT_CANCEL_GRACE_SECONDS,
        ge=0,
        le=300,
        description=(
            "When a running flow run is cancelled, how long a command that handles "
            "cancellation itself ('prefect flow-run execute') gets before the worker terminates "
            "the sandbox. Prefect's engine command cannot react, so its sandbox is terminated "
            "at once."
        ),
    )
    modal_credentials: ModalCredentials | None = Field(
        default=None,
        description=(
            "Modal credentials block. Empty: Modal's own config (`modal token new`, "
            "MODAL_TOKEN_ID/SECRET), or, with none, a local Modal server started by the worker."
        ),
    )

    # Errors never echo the whole input (env and credentials hold secrets);
    # `_name_the_value` repeats the one refused value of a non-secret field.
    model_config = ConfigDict(hide_input_in_errors=True)

    _spec: SandboxSpec = PrivateAttr(default_factory=SandboxSpec)
    _needs_prefect_modal: bool = PrivateAttr(default=False)
    _task_specs: dict[str, SandboxSpec] = PrivateAttr(default_factory=dict)
    _user_env_names: list[str] = PrivateAttr(default_factory=list)

    @field_validator("gpu", "image", "app_name", "registry_secret", "modal_environment", "cloud")
    @classmethod
    def _blank(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None

    @field_validator(*SPEC_FIELDS, "mode", "max_parallelism", "cancel_grace_seconds", mode="wrap")
    @classmethod
    def _name_the_value(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        return name_the_value(cls, value, handler, info)

    @model_validator(mode="after")
    def _validate_spec(self) -> ModalWorkerJobConfiguration:
        values = {n: getattr(self, n) for n in SPEC_FIELDS if getattr(self, n) is not None}
        self._spec = _spec_or_error(values, where="")
        if self.max_parallelism is not None and self.max_parallelism < 1:
            raise ValueError(
                f"Invalid job variable 'max_parallelism': {self.max_parallelism!r}; "
                "use 1 or more, or leave it empty."
            )
        if self.task_specs and self.mode != "per_step":
            raise ValueError(_pipeline_task_specs_message(self.task_specs))
        self._task_specs = {
            task: _spec_or_error(settings, where=f"task_specs[{task!r}].")
            for task, settings in (self.task_specs or {}).items()
        }
        return self

    @property
    def spec(self) -> SandboxSpec:
        """The validated sandbox spec (without env: Prefect's env is added by the worker)."""
        return self._spec

    @property
    def per_task_specs(self) -> dict[str, SandboxSpec]:
        return dict(self._task_specs)

    def sandbox_spec(self) -> SandboxSpec:
        """The spec of the flow run's own sandbox.

        The default image gets the worker's prefect version (the sandbox runs
        Prefect's engine); in per_step mode the flow's sandbox only orchestrates,
        so it gets no GPU: the pool's GPU goes to the task sandboxes.
        """
        spec = self._spec
        extra: dict[str, Any] = {}
        if not spec.image:
            # prefect-modal is not on PyPI: its code goes in as local source (as on
            # Modal), its dependencies and prefect's at this worker's versions. A pool
            # whose storage steps or result volume run prefect_modal code needs it too.
            with_self = self.mode == "per_step" or self._needs_prefect_modal
            roots = ["prefect", "prefect-modal"] if with_self else ["prefect"]
            pins = [p for p in dependency_pins(*roots) if not _is_self(p)]
            extra["pip_packages"] = missing_pins(pins, spec.pip_packages or [])
            if with_self:
                extra["local_python_sources"] = ["prefect_modal"]
        if self.mode == "per_step" and spec.gpu_config:
            extra["gpu"] = None
            extra["gpu_count"] = None
        if not extra:
            return spec
        data = {n: getattr(spec, n) for n in spec.model_fields_set}
        data.update({k: v for k, v in extra.items() if k != "pip_packages"})
        if "local_python_sources" in extra:
            data["local_python_sources"] = list(
                dict.fromkeys([*extra["local_python_sources"], *(spec.local_python_sources or [])])
            )
        if "pip_packages" in extra:
            data["pip_packages"] = list(
                dict.fromkeys([*extra["pip_packages"], *(spec.pip_packages or [])])
            )
        return SandboxSpec(**{k: v for k, v in data.items() if v is not None})

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        """Prefect's env, labels and name, then the sandbox name and the mode's command."""
        template = self.name
        # Before Prefect adds its own env: these are the job's variables, which
        # per_step mode passes on to the task sandboxes (Prefect's are not needed there).
        self._user_env_names = sorted(k for k, v in self.env.items() if v is not None)
        if not self.command:
            self.command = PER_STEP_COMMAND if self.mode == "per_step" else PIPELINE_COMMAND
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self.name = sandbox_name_for(self.name if template else None, flow_run.id)
        if work_pool is not None:
            from prefect_modal.bundles import volume_names

            # A pool whose bundles live on a Modal Volume: the execute step reads it.
            self.mount_storage_volumes(volume_names(work_pool))

    def mount_storage_volumes(self, volume_names: list[str]) -> None:
        """Mount `ModalVolume` storage (results, bundles) and tell the sandbox where.

        The block inside the sandbox then reads and writes the mounted folder, so
        the sandbox needs no Modal token to store a result (see `storage.py`).
        """
        from prefect_modal.storage import ENV_VOLUME_MOUNTS, mount_path_for

        if not volume_names:
            return
        mounts = {mount_path_for(name): name for name in volume_names}
        self._needs_prefect_modal = True  # the block's class must unpickle there
        self.volumes = {**(self.volumes or {}), **mounts}  # type: ignore[assignment]
        values = {n: getattr(self, n) for n in SPEC_FIELDS if getattr(self, n) is not None}
        self._spec = _spec_or_error(values, where="")
        known = json.loads(self.env.get(ENV_VOLUME_MOUNTS) or "{}")
        known.update({name: path for path, name in mounts.items()})
        self.env[ENV_VOLUME_MOUNTS] = json.dumps(known)

    def sandbox_tags(self, flow_run: FlowRun) -> dict[str, str]:
        """Tags that let any worker find this run's sandbox (see `reconcile.py`)."""
        tags = {
            TAG_FLOW_RUN: str(flow_run.id),
            TAG_ROLE: ROLE_FLOW,
            TAG_MODE: self.mode,
            TAG_DEPLOYMENT: self.labels.get("prefect.io/deployment-id", ""),
            TAG_WORK_POOL: self.labels.get("prefect.io/work-pool-id", ""),
            TAG_WORKER: self.labels.get("prefect.io/worker-name", ""),
        }
        return {k: v for k, v in tags.items() if v}

    def sandbox_env(self, target_env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """(plain, secret) environment of the flow run's sandbox.

        Prefect's env (API URL, flow run id, settings) plus the user's; in
        per_step mode also how to reach Modal and the task spec.  The API key,
        Modal tokens and anything secret-looking travel as a `modal.Secret`.
        """
        env = {k: v for k, v in self.env.items() if v is not None}
        if self.mode == "per_step":
            env.update(target_env)
            env[ENV_MODE] = "per_step"
            env[ENV_TASK_SPEC] = json.dumps(self._spec.model_dump(mode="json", exclude_none=True))
            env[ENV_TASK_ENV_NAMES] = ",".join(self._user_env_names)
            if self.max_parallelism:
                env[ENV_MAX_PARALLELISM] = str(self.max_parallelism)
            if self._task_specs:
                env[ENV_TASK_SPECS] = json.dumps(
                    {
                        task: spec.model_dump(mode="json", exclude_none=True, exclude={"env"})
                        for task, spec in self._task_specs.items()
                    }
                )
        return split_env(env)


def _spec_or_error(values: dict[str, Any], where: str) -> SandboxSpec:
    """Build a SandboxSpec, turning its errors into one that names the job variable."""
    try:
        return SandboxSpec(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error.get("loc", ()))
            message = str(error.get("msg", "")).removeprefix("Value error, ")
            problems.append(f"{where}{loc}: {message}" if loc else f"{where or ''}{message}")
        raise ValueError("Invalid job variable " + "; ".join(problems)) from None


def _pipeline_task_specs_message(task_specs: dict[str, dict[str, Any]]) -> str:
    image_settings = sorted(
        {f"task_specs[{t!r}].{k}" for t, s in task_specs.items() for k in s if k in IMAGE_FIELDS}
    )
    what = ", ".join(image_settings) if image_settings else "task_specs"
    return (
        f"Invalid job variable {what}: per-task sandbox settings need each task in its own "
        "sandbox, but mode is 'pipeline' (the whole flow run in one sandbox). Set the job "
        "variable mode: per_step, or move the settings to the pool-level variables "
        "(image, gpu, ...) to apply them to the whole flow run."
    )


class ModalWorkerResult(BaseWorkerResult):
    """The flow run's sandbox ended: its id and exit code."""


@dataclass
class InFlight:
    """A flow run whose sandbox this worker process is watching."""

    flow_run_id: UUID
    configuration: ModalWorkerJobConfiguration | None = None
    target: Target | None = None
    sandbox: Any = None
    sandbox_id: str | None = None
    adopted: bool = False
    secret_values: tuple[str, ...] = ()
    tail: Any = None
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    cancel_started: bool = False
    cancelled_by_worker: bool = False
    reaped: bool = False  # terminated by the watcher after its run was final
    events: Any = None  # events.SandboxEvents of the sandbox, once it is known
    flow_run: FlowRun | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    cancel_done: anyio.Event = field(default_factory=anyio.Event)
    exit_code: int | None = None


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
        from prefect_modal.reconcile import Reconciler

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
        from prefect_modal.targets import resolve_target

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
        from prefect_modal.adhoc import submit_adhoc_run

        await submit_adhoc_run(self, flow, parameters, job_variables, task_status, flow_run)

    # -- run ----------------------------------------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ModalWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> ModalWorkerResult:
        """Start (or find) the flow run's sandbox, report its id, follow it to its end."""
        from prefect_modal import sandboxes

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
            entry.sandbox_id = sandboxes.sandbox_id(sandbox)
            payload = self.stdin_payloads.pop(flow_run.id, None)
            if payload is not None and created:
                await self.in_thread(sandboxes.send_stdin_chunked, sandbox, payload)
            logger.info(
                "%s Modal sandbox %s (%s) in app %r on %s; see: %s",
                "Started" if created else "Found running",
                entry.sandbox_id,
                configuration.name,
                spec.effective_app_name,
                target.kind,
                sandboxes.dashboard_url(
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
        from prefect_modal import sandboxes

        name = configuration.name or sandbox_name_for(None, flow_run.id)
        found = sandboxes.list_in_app(
            spec.effective_app_name,
            {TAG_FLOW_RUN: str(flow_run.id), TAG_ROLE: ROLE_FLOW},
            target.client,
            spec.modal_environment,
        )
        if found:
            return found[0], False
        assert configuration.command
        try:
            sandbox = sandboxes.create_sandbox(
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
        except sandboxes.AlreadyExistsError:
            existing = sandboxes.from_name(
                spec.effective_app_name, name, target.client, spec.modal_environment
            )
            if existing is None:
                raise
            tags = sandboxes.sandbox_tags(existing)
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
        from prefect_modal import sandboxes
        from prefect_modal.reconcile import SandboxLogForwarder, crash_message

        logger = self.get_flow_run_logger(flow_run)
        entry.tail = sandboxes.OutputTail()
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
        threads = sandboxes.stream_output(entry.sandbox, forwarder.on_line, entry.tail)
        code = await self.in_thread(sandboxes.wait_returncode, entry.sandbox)
        exit_code = -1 if code is None else int(code)
        for thread in threads:
            await self.in_thread(thread.join, 5)
        if entry.cancel_started:
            with anyio.move_on_after(30):
                await entry.cancel_done.wait()
        status = "succeeded" if exit_code == 0 else "failed"
        if entry.cancelled_by_worker or entry.reaped:
            status = "terminated"
        elif exit_code == 124:
            status = "timeout"
        elif exit_code != 0:
            state = await self._current_state(flow_run.id)
            if state is not None and not state.is_final():
                status = "crashed"
                await self._propose_crashed_state(
                    flow_run,
                    crash_message(
                        entry.sandbox_id or "", exit_code, entry.tail.text(), entry.secret_values
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
        from prefect_modal import sandboxes
        from prefect_modal.artifacts import SandboxArtifact

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
            link=sandboxes.dashboard_url(
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
        from prefect_modal.artifacts import write_flow_summary, write_sandbox_artifact

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
        from prefect_modal import sandboxes

        for entry in self.in_flight.values():
            if entry.sandbox_id == infrastructure_pid:
                entry.cancelled_by_worker = True
        target = await self.target_for(configuration)
        if not await self.in_thread(sandboxes.terminate_by_id, infrastructure_pid, target.client):
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
        from prefect_modal import sandboxes

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
                await self.in_thread(sandboxes.terminate, entry.sandbox)
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
