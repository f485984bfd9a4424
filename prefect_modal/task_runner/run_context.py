"""What travels with a call whose code uses Prefect: its run context, as data.

Captured in the engine thread, where the task body would run under
ThreadPoolTaskRunner, so every value is what that body would see; rebuilt in
the sandbox by `remote_context.py`, whose source travels along.  Only calls
that refer to Prefect carry it (see `core/packages.py`): for the others nothing
changes, and the sandbox never imports Prefect.

Never in it: the Prefect API key, the flow object (its task runner holds the
Modal credentials), result storage blocks, hooks.  Values that would need an
API call in the sandbox (parent and root flow run, deployment name and
version, run URLs) are read here, once per flow run, and sent as constants.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

import cloudpickle

from prefect_modal.task_runner import remote_context
from prefect_modal.task_runner.options import ATTRIBUTE as OPTIONS_ATTRIBUTE

#: Task attributes that never travel: hooks and policies run in the flow's
#: process (the engine is there), and storage blocks may hold credentials.
_STAY_HOME: dict[str, Any] = {
    "on_completion_hooks": [],
    "on_failure_hooks": [],
    "on_running_hooks": [],
    "on_commit_hooks": [],
    "on_rollback_hooks": [],
    "retry_condition_fn": None,
    "cache_key_fn": None,
    "result_storage": None,
    "result_serializer": None,
    "task_run_name": None,
}

_source: list[str] = []
_per_flow_run: dict[UUID, dict[str, Any]] = {}
_lock = threading.Lock()
logger = logging.getLogger("prefect_modal.task_runner")


def remote_source() -> str:
    """The text of `remote_context.py`, executed by the bootstrap when a call needs it."""
    if not _source:
        with open(remote_context.__file__, encoding="utf-8") as f:
            _source.append(f.read())
    return _source[0]


def _light_task(task: Any, fn: Callable[..., Any]) -> Any:
    light = copy.copy(task)
    light.fn = fn
    for name, value in _STAY_HOME.items():
        if hasattr(light, name):
            setattr(light, name, value)
    # `modal_options(...)(task)` options are the flow's business; pickled by reference
    # they would make the sandbox import prefect_modal, which its image need not have
    light.__dict__.pop(OPTIONS_ATTRIBUTE, None)
    return light


def _read(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except Exception as exc:  # a value we cannot read stays unset remotely
        logger.debug("prefect-modal: runtime value unavailable: %s", exc)
        return None


def _picklable(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except Exception:
        return False
    return True


def _flow_run_part(flow_ctx: Any) -> dict[str, Any]:
    """Flow run, flow and deployment values: the same for every call of a flow run."""
    import prefect.runtime.deployment as deployment_rt
    import prefect.runtime.flow_run as flow_run_rt
    from prefect.context import _deployment_id, _deployment_parameters

    flow_run = flow_ctx.flow_run
    flow = flow_ctx.flow
    parameters = flow_ctx.parameters
    if parameters is not None and not _picklable(parameters):
        logger.warning(
            "prefect-modal: the flow's parameters cannot be pickled; "
            "prefect.runtime.flow_run.parameters is empty inside sandboxes"
        )
        parameters = None
    has_parent = getattr(flow_run, "parent_task_run_id", None) is not None
    runtime_flow: dict[str, Any] = {
        "api_url": _read(lambda: flow_run_rt.api_url),
        "ui_url": _read(lambda: flow_run_rt.ui_url),
    }
    if has_parent:
        runtime_flow["parent_flow_run_id"] = _read(lambda: flow_run_rt.parent_flow_run_id)
        runtime_flow["parent_deployment_id"] = _read(lambda: flow_run_rt.parent_deployment_id)
        runtime_flow["root_flow_run_id"] = _read(lambda: flow_run_rt.root_flow_run_id)
    deployment_id = _deployment_id.get() or getattr(flow_run, "deployment_id", None)
    # Read here even without a deployment: Prefect answers these through the API
    # (deployment.parameters gives the flow run's parameters then).
    runtime_deployment: dict[str, Any] = {
        "id": str(deployment_id) if deployment_id else None,
        "name": _read(lambda: deployment_rt.name) if deployment_id else None,
        "version": _read(lambda: deployment_rt.version) if deployment_id else None,
        "parameters": _read(lambda: deployment_rt.parameters),
    }
    return {
        "flow": {
            "name": getattr(flow, "name", None) or "flow",
            "version": getattr(flow, "version", None),
            "log_prints": getattr(flow_ctx, "log_prints", False),
            "flow_run": flow_run,
            "parameters": parameters,
        },
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": _deployment_parameters.get(),
        "runtime": {"flow_run": runtime_flow, "deployment": runtime_deployment},
    }


def capture(task_ctx: Any, fn: Callable[..., Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """The run context of the task run in `task_ctx`, as the sandbox rebuilds it."""
    import prefect.runtime.task_run as task_run_rt
    from prefect.context import FlowRunContext, TagsContext
    from prefect.settings import PREFECT_API_URL

    flow_ctx = FlowRunContext.get()
    data: dict[str, Any] = {}
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        key = flow_ctx.flow_run.id
        with _lock:
            part = _per_flow_run.get(key)
        if part is None:
            part = _flow_run_part(flow_ctx)
            with _lock:
                _per_flow_run[key] = part
                while len(_per_flow_run) > 64:  # a long-lived process runs many flows
                    _per_flow_run.pop(next(iter(_per_flow_run)))
        data.update(part)
        data["runtime"] = {
            **part["runtime"],
            "task_run": {
                "api_url": _read(lambda: task_run_rt.api_url),
                "ui_url": _read(lambda: task_run_rt.ui_url),
            },
        }
    task_run = task_ctx.task_run
    current = TagsContext.get().current_tags or set()
    data.update(
        source=remote_source(),
        task=_light_task(task_ctx.task, fn),
        task_run=task_run,
        parameters=parameters,
        log_prints=bool(task_ctx.log_prints),
        tags=sorted(set(current) | set(task_run.tags or ())),
        log_level=logging.getLogger("prefect.task_runs").getEffectiveLevel(),
        api_url=str(PREFECT_API_URL.value() or "") or None,
    )
    return data


def forget_flow_run(flow_run_id: UUID) -> None:
    with _lock:
        _per_flow_run.pop(flow_run_id, None)
