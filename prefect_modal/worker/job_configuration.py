"""`ModalWorkerJobConfiguration`: the ``modal`` work pool's job variables, validated.

Its fields are the pool's job variables (the `SandboxSpec` fields one to one,
plus the worker's own: mode, command, task specs, credentials); it turns them
into the spec of a flow run's sandbox and its environment.  It lives apart from
the worker so that the modules that read a configuration (the watcher in
`reconcile.py`, ad-hoc calls in `adhoc.py`, `per_step.py`) need not import the
worker, which imports them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from prefect.workers.base import BaseJobConfiguration
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

from prefect_modal.core import resources, tags
from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.packages import dependency_pins, missing_pins, requirement_name
from prefect_modal.core.spec import SandboxSpec, name_the_value

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

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
ROLE_FLOW = tags.ROLE_FLOW_RUN

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
