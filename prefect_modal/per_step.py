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

from prefect_modal.settings import SandboxSpec
from prefect_modal.task_runner import ModalTaskRunner
from prefect_modal.worker import (
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
        return type(options)(spec=(options.spec or self.spec).merged_with(override), local=False)


def runner_from_env(
    environ: dict[str, str] | os._Environ[str] = os.environ,
) -> ModalTaskRunner[Any]:
    """The task runner the worker asked for, from the variables it set."""
    data = json.loads(environ.get(ENV_TASK_SPEC) or "{}")
    names = [n for n in (environ.get(ENV_TASK_ENV_NAMES) or "").split(",") if n]
    env = {n: environ[n] for n in names if n in environ}
    if env:
        data["env"] = env
    spec = SandboxSpec(**data)
    PerStepTaskRunner.task_specs = {
        name: SandboxSpec(**fields)
        for name, fields in json.loads(environ.get(ENV_TASK_SPECS) or "{}").items()
    }
    kwargs: dict[str, Any] = {"spec": spec}
    if environ.get(ENV_MAX_PARALLELISM):
        kwargs["max_parallelism"] = int(environ[ENV_MAX_PARALLELISM])
    return PerStepTaskRunner(**kwargs)


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
        runner = runner_from_env()
        run_logger.info(
            "prefect-modal per_step mode: each task call runs in its own Modal sandbox (%r).",
            runner,
        )
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
