"""Inside a sandbox: the Prefect run context a task body sees under ThreadPoolTaskRunner.

Loaded only for a call whose code refers to Prefect (the runner found it in
the pickle or the function's code, see `packages.py`); its source travels in
that call's payload and the bootstrap (`remote.py`) executes it, so a task
that does not use Prefect never imports it remotely.

What it rebuilds, from data the flow process captured (`run_context.py`):
a `TaskRunContext` (task run, task, parameters, log_prints), the flow run's
`FlowRunContext`, `tags(...)` with the task run's tags, the deployment
context variables, and constants for the `prefect.runtime` fields that would
otherwise need the API (parent/root flow run, URLs, deployment name/version).
`get_run_logger()` records go back to the flow process as structured lines
and are emitted there on the task run's logger, at their level, with their
`extra` fields.

What it cannot give: the Prefect API.  The sandbox has no API key and no
route to the API by design, so the context's client answers every request
with an error that says so, and submitting or calling a task from here fails
with a message that says what to write instead (never Prefect's "Unable to
determine task runner").
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from typing import Any

#: Why the API is missing and what to do, shared by every refusal below.
API_UNAVAILABLE = (
    "The Prefect API is not available inside a Modal sandbox started by ModalTaskRunner: "
    "the sandbox has no Prefect API key and no route to the API, by design (the task "
    "engine, its states, results and logs stay in the flow's process)."
)

#: LogRecord attributes that are not user `extra` (Prefect's own ids are re-added
#: by the flow process's run logger).
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "task_run_id",
    "task_run_name",
    "task_name",
    "flow_run_id",
    "flow_run_name",
    "flow_name",
    "send_to_api",
}


class RecordHandler(logging.Handler):
    """Sends each record of Prefect's run loggers to the flow process, one line each."""

    def __init__(self, emit_record: Any) -> None:
        super().__init__()
        self._emit_record = emit_record

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            extra = {
                k: v
                for k, v in record.__dict__.items()
                if k not in _RECORD_FIELDS and not k.startswith("_")
            }
            body = json.dumps({"name": record.name, "msg": message, "extra": extra}, default=str)
            self._emit_record(record.levelno, body)
        except Exception:
            self.handleError(record)


def _refuse_api() -> Any:
    """A transport that fails every request with the reason (no network is tried)."""
    import httpx

    class NoApiTransport(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            raise RuntimeError(f"{API_UNAVAILABLE} (request: {request.method} {request.url.path})")

    return NoApiTransport()


def _nested_message(child: str, parent: str, how: str) -> str:
    return (
        f"Task {child!r} was {how} inside task {parent!r}, which runs in a Modal sandbox. "
        f"{API_UNAVAILABLE} So prefect-modal cannot record a task run for {child!r} from "
        f"here. Instead: submit {child!r} from the flow and pass its future to {parent!r}; "
        f"or call its function as plain Python in this sandbox with `{child}.fn(...)`; or "
        f"run {parent!r} in the flow's process with modal_options(local=True), where "
        "nested calls and submits work as in Prefect (a submitted child still gets its own "
        "sandbox)."
    )


def _sandbox_task_runner(parent: str) -> Any:
    from prefect.task_runners import TaskRunner

    class SandboxTaskRunner(TaskRunner[Any]):
        """The flow's task runner as seen from inside a sandbox: refuses, explaining."""

        @property
        def name(self) -> str:
            return "modal-sandbox"

        def duplicate(self) -> SandboxTaskRunner:
            return self

        def submit(
            self, task: Any, parameters: Any, wait_for: Any = None, dependencies: Any = None
        ) -> Any:
            raise RuntimeError(_nested_message(task.name, parent, "submitted"))

        def map(self, task: Any, parameters: Any, wait_for: Any = None) -> Any:
            raise RuntimeError(_nested_message(task.name, parent, "mapped"))

    return SandboxTaskRunner()


def _refuse_direct_calls(stack: ExitStack, parent: str) -> None:
    """`child(x)` in the sandbox would run Prefect's engine against the API: explain instead."""
    import prefect.task_engine as engine

    original = engine.run_task

    def run_task(task: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_nested_message(task.name, parent, "called"))

    engine.run_task = run_task  # type: ignore[assignment]
    stack.callback(setattr, engine, "run_task", original)


def _placeholder_flow_fn() -> None:
    """Stands in for the flow's function, which stays in the flow's process."""


def _runtime_constants(stack: ExitStack, values: dict[str, dict[str, Any]]) -> None:
    """Answer `prefect.runtime` fields that would need the API with the flow's values."""
    import importlib

    for module_name, fields in values.items():
        module = importlib.import_module(f"prefect.runtime.{module_name}")
        table = getattr(module, "FIELDS", None)
        if not isinstance(table, dict):
            continue
        for name, value in fields.items():
            if name not in table:
                continue
            previous = table[name]
            table[name] = lambda value=value: value
            stack.callback(table.__setitem__, name, previous)


def enter(data: dict[str, Any], emit_record: Any) -> ExitStack:
    """Enter the run context described by `data`; close the returned stack to leave it."""
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.context import (
        FlowRunContext,
        TaskRunContext,
        _deployment_id,
        _deployment_parameters,
        tags,
    )
    from prefect.flows import Flow
    from prefect.results import ResultStore
    from prefect.tasks import Task

    # As Prefect's own `hydrated_context` does: the context models refer to Flow
    # and Task by forward reference, resolved only once those are imported.
    names = {"Flow": Flow, "Task": Task, "ResultRecordMetadata": ResultRecordMetadata}
    FlowRunContext.model_rebuild(_types_namespace=names)
    TaskRunContext.model_rebuild(_types_namespace=names)

    stack = ExitStack()
    try:
        handler = RecordHandler(emit_record)
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            run_logger = logging.getLogger(name)
            run_logger.addHandler(handler)
            run_logger.propagate = False
            run_logger.setLevel(data.get("log_level") or logging.INFO)

        client = SyncPrefectClient(
            data.get("api_url") or "http://prefect-api.invalid/api",
            httpx_settings={"transport": _refuse_api()},
        )
        task = data["task"]
        parent = task.name
        flow_data = data.get("flow")
        if flow_data is not None:
            flow = Flow(
                fn=_placeholder_flow_fn,
                name=flow_data["name"],
                version=flow_data.get("version"),
                log_prints=flow_data.get("log_prints"),
                validate_parameters=False,
            )
            stack.enter_context(
                FlowRunContext(
                    flow=flow,
                    flow_run=flow_data["flow_run"],
                    parameters=flow_data.get("parameters"),
                    log_prints=bool(flow_data.get("log_prints")),
                    task_runner=_sandbox_task_runner(parent),
                    result_store=ResultStore(),
                    client=client,
                    detached=True,
                )
            )
        if data.get("deployment_id"):
            from uuid import UUID

            token = _deployment_id.set(UUID(str(data["deployment_id"])))
            stack.callback(_deployment_id.reset, token)
        if data.get("deployment_parameters") is not None:
            token2 = _deployment_parameters.set(data["deployment_parameters"])
            stack.callback(_deployment_parameters.reset, token2)
        stack.enter_context(tags(*data.get("tags", ())))
        stack.enter_context(
            TaskRunContext(
                task=task,
                task_run=data["task_run"],
                parameters=data.get("parameters") or {},
                log_prints=bool(data.get("log_prints")),
                result_store=ResultStore(),
                client=client,
            )
        )
        _runtime_constants(stack, data.get("runtime") or {})
        _refuse_direct_calls(stack, parent)
    except BaseException:
        stack.close()
        raise
    return stack
