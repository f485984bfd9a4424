"""The flow run's entry point in the worker's ``per_step`` mode.

Run as ``python -m prefect_modal.per_step``.

The worker starts this in the flow run's (light) sandbox instead of Prefect's
``python -m prefect.engine``.  It does what that module does (load the flow run,
run the deployment's pull steps, load the flow, run it under Prefect's signal
handling) with one change: the flow's task runner becomes a `ModalTaskRunner`,
through Prefect's own ``flow.with_options(task_runner=...)``, so every
submitted task call gets its own sandbox.

Why an entry point and not a setting: Prefect has no setting that replaces a
flow's task runner (the runner is part of the flow object), and patching the
user's code or Prefect's modules would break on either's next release.
``with_options`` is public API; this module relies on nothing else, plus the
engine functions ``python -m prefect.engine`` itself calls.

Whose settings win: the work pool gives the defaults, the flow's code the
specifics.  Layered field by field (`SandboxSpec.merged_with`), from the least
to the most specific: the pool's job variables (with the deployment's
``job_variables``), then the flow's own ``ModalTaskRunner(spec=...)``, then a
task's ``modal_options``, then the deployment's ``task_specs`` for that task
(named explicitly for it).  The flow's ``max_parallelism`` and
``default_local`` hold unless the pool sets ``max_parallelism``.  The run gets
a ``modal-task-spec-*`` artifact showing each layer.

Configuration comes from the environment the worker set (see `worker.py`):
the task spec (`PREFECT_MODAL_TASK_SPEC`, JSON, no secret values), the names
of the job's env variables to pass on to task sandboxes (their values, secret
ones included, are read from this process's environment, where they arrived
as plain env or as a `modal.Secret`), per-task settings by task name, and
`PREFECT_MODAL_MAX_PARALLELISM`.  Modal itself is reached through
MODAL_SERVER_URL / MODAL_TOKEN_* (the token as a secret).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any
from uuid import UUID

from prefect_modal.core.spec import SandboxSpec
from prefect_modal.task_runner.runner import ModalTaskRunner
from prefect_modal.worker.job_configuration import (
    ENV_MAX_PARALLELISM,
    ENV_TASK_ENV_NAMES,
    ENV_TASK_SPEC,
    ENV_TASK_SPECS,
)


class PerStepTaskRunner(ModalTaskRunner[Any]):
    """A `ModalTaskRunner` that also applies the work pool's per-task settings by task name.

    The settings live on the class, not the instance, so Prefect's
    `duplicate()` copies (which call the constructor) keep them.
    """

    task_specs: dict[str, SandboxSpec] = {}

    def options_for(self, task: Any) -> Any:
        options = super().options_for(task)
        override = self.task_specs.get(task.name)
        if override is None or options.local:
            return options
        return type(options)(
            spec=(options.spec or self.spec).merged_with(override), local=False, reuse=options.reuse
        )


def pool_spec_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> SandboxSpec:
    """The work pool's task spec (job variables, deployment overrides included)."""
    data = json.loads(environ.get(ENV_TASK_SPEC) or "{}")
    names = [n for n in (environ.get(ENV_TASK_ENV_NAMES) or "").split(",") if n]
    env = {n: environ[n] for n in names if n in environ}
    if env:
        data["env"] = env
    return SandboxSpec(**data)


def runner_from_env(
    environ: dict[str, str] | os._Environ[str] = os.environ,
    flow_runner: Any = None,
) -> ModalTaskRunner[Any]:
    """The task runner the worker asked for, from the variables it set, with the flow's
    own `ModalTaskRunner` settings (`flow_runner`) laid over the pool's."""
    spec = pool_spec_from_env(environ)
    PerStepTaskRunner.task_specs = {
        name: SandboxSpec(**fields)
        for name, fields in json.loads(environ.get(ENV_TASK_SPECS) or "{}").items()
    }
    kwargs: dict[str, Any] = {}
    if isinstance(flow_runner, ModalTaskRunner):
        spec = spec.merged_with(flow_runner.spec)
        kwargs.update(
            max_parallelism=flow_runner.max_parallelism,
            default_local=flow_runner.default_local,
            max_result_bytes=flow_runner.max_result_bytes,
            log_level=flow_runner.log_level,
            reuse_sandboxes=flow_runner.reuse_sandboxes,
            idle_seconds=flow_runner.idle_seconds,
            result_volume=getattr(flow_runner, "result_volume", None),
        )
    kwargs["spec"] = spec
    if environ.get(ENV_MAX_PARALLELISM):
        kwargs["max_parallelism"] = int(environ[ENV_MAX_PARALLELISM])
    return PerStepTaskRunner(**kwargs)


def spec_layers(
    pool: SandboxSpec, flow_runner: Any, effective: SandboxSpec
) -> list[dict[str, Any]]:
    """One row per field someone set: the pool's value, the flow's, and what tasks get.

    Env values are never shown (they may be secrets), only their names.
    """
    flow_spec = flow_runner.spec if isinstance(flow_runner, ModalTaskRunner) else None

    def shown(spec: SandboxSpec | None, name: str) -> Any:
        if spec is None or name not in spec.model_fields_set:
            return None
        value = getattr(spec, name)
        if name == "env":
            return ", ".join(sorted(value or {})) or None
        return value if isinstance(value, str | int | float | type(None)) else json.dumps(value)

    names = sorted(pool.model_fields_set | (flow_spec.model_fields_set if flow_spec else set()))
    return [
        {
            "field": name,
            "work pool (defaults)": shown(pool, name),
            "flow's ModalTaskRunner (specifics)": shown(flow_spec, name),
            "tasks get": shown(effective, name),
        }
        for name in names
    ]


def write_layers_artifact(
    flow_run_id: UUID, pool: SandboxSpec, flow_runner: Any, effective: SandboxSpec
) -> None:
    """The run's record of whose settings its task sandboxes got (never fails the run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    flow_note = (
        "the flow's own ModalTaskRunner(spec=...) is laid over them"
        if isinstance(flow_runner, ModalTaskRunner)
        else f"the flow's task runner ({type(flow_runner).__name__}) has no sandbox settings"
    )
    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(
                ArtifactCreate(
                    key=f"modal-task-spec-{flow_run_id.hex[:8]}",
                    type="table",
                    description=(
                        "per_step via the worker: the work pool's job variables give the "
                        f"defaults, {flow_note}; a task's modal_options and the deployment's "
                        "task_specs come on top, task by task."
                    ),
                    data=json.dumps(spec_layers(pool, flow_runner, effective)),
                    flow_run_id=flow_run_id,
                )
            )
    except Exception as exc:
        print(f"prefect-modal: could not write the task spec artifact: {exc}", file=sys.stderr)


def _engine_helpers() -> tuple[Any, Any, Any]:
    """What `python -m prefect.engine` uses around `run_flow`, tolerating their absence.

    They are Prefect internals (the runner's control channel, run metrics, the
    driver of generator flows); a Prefect release that moves them must not
    break per_step runs, only lose what they add.
    """
    try:
        from prefect._internal.control_listener import configure_from_env
    except ImportError:  # pragma: no cover - other Prefect versions

        def configure_from_env() -> None:
            return None

    try:
        from prefect._internal.metrics import RunMetrics
    except ImportError:  # pragma: no cover

        def RunMetrics(*_: Any) -> Any:  # type: ignore[misc]
            return contextlib.nullcontext()

    try:
        from prefect.engine import _drive_run_flow_result
    except ImportError:  # pragma: no cover

        def _drive_run_flow_result(flow: Any, run_result: object) -> None:
            return None

    return configure_from_env, RunMetrics, _drive_run_flow_result


def main() -> None:
    """`python -m prefect.engine`'s steps, with the task runner replaced."""
    from prefect.engine import engine_logger, handle_engine_signals

    configure_from_env, run_metrics, drive_result = _engine_helpers()
    try:
        flow_run_id = UUID(sys.argv[1] if len(sys.argv) > 1 else os.environ["PREFECT__FLOW_RUN_ID"])
    except Exception:
        engine_logger.error(f"Invalid flow run id. Received arguments: {sys.argv}", exc_info=True)
        sys.exit(1)
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        from prefect.flow_engine import flow_run_logger, load_flow, load_flow_run, run_flow

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        run_logger = flow_run_logger(flow_run=flow_run)
        try:
            flow = load_flow(flow_run)
        except Exception:
            run_logger.error(
                "Unexpected exception encountered when trying to load flow", exc_info=True
            )
            raise
        flow_runner = getattr(flow, "task_runner", None)
        runner = runner_from_env(flow_runner=flow_runner)
        run_logger.info(
            "prefect-modal per_step mode: each task call runs in its own Modal sandbox (%r); "
            "the pool's settings are the defaults, the flow's own ModalTaskRunner's the "
            "specifics.",
            runner,
        )
        write_layers_artifact(flow_run_id, pool_spec_from_env(), flow_runner, runner.spec)
        flow = flow.with_options(task_runner=runner)  # type: ignore[arg-type]
        with run_metrics(flow_run, flow):
            result: object = run_flow(
                flow,
                flow_run=flow_run,
                error_logger=run_logger,  # type: ignore[arg-type]
            )
            drive_result(flow, result)


if __name__ == "__main__":
    main()
