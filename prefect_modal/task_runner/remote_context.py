"""Inside a sandbox: the Prefect run context a task body sees under ThreadPoolTaskRunner.

Loaded only for a call whose code refers to Prefect (the runner found it in
the pickle or the function's code, see `core/packages.py`); its source travels in
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

Nested task calls and submits (`child.submit(x)`, `child.map(...)`,
`child(x)`) are proxied: the flow process submits them through the flow's own
runner (see `Proxy`), so each child has its own task run and sandbox.

What it cannot give: the Prefect API.  The sandbox has no API key and no
route to the API by design, so the context's client answers every request
with an error that says so.
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
    "engine, its states, results and logs stay in the flow's process). Do API work in "
    "the flow, or in a task run in the flow's process with modal_options(local=True)."
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


#: How a future travels inside submitted parameters (the flow process swaps in its own).
FUTURE_REF = "__prefect_modal_future__"


class Proxy:
    """The sandbox's end of nested task calls: each is submitted by the flow process.

    A request goes out on the private channel as a SUBMIT frame (the task, its
    parameters, the futures it waits for); the flow process submits it through
    the flow's own runner, under this task run's context, so the child gets its
    own task run (with this one as its parent) and its own sandbox, and answers
    on stdin: "accepted" with the child's task run id, later "done" with its
    final state and value or exception.
    """

    def __init__(self, send: Any, replies_fd: int, nonce: str, remote: Any) -> None:
        import threading

        self._send = send
        self._nonce = nonce
        self._remote = remote
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, Any] = {}
        self._futures: dict[int, Any] = {}
        threading.Thread(
            target=self._read, args=(replies_fd,), name="prefect-modal-replies", daemon=True
        ).start()

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any, how: str) -> Any:
        import threading

        import cloudpickle
        from prefect.futures import PrefectFuture

        with self._lock:
            request = self._next
            self._next += 1
            accepted: dict[str, Any] = {"event": threading.Event()}
            self._waiting[request] = accepted
        waits = [f.task_run_id for f in (wait_for or []) if isinstance(f, PrefectFuture)]
        try:
            body = cloudpickle.dumps((request, how, task, _to_refs(parameters), waits))
        except Exception as exc:
            with self._lock:
                self._waiting.pop(request, None)
            raise TypeError(
                f"prefect-modal could not send task {task.name!r} from this sandbox to the "
                "flow process, which submits it: the task and its parameters must be "
                f"picklable ({type(exc).__name__}: {exc}). Pass plain data."
            ) from exc
        self._send("SUBMIT", body)
        accepted["event"].wait()
        if "refused" in accepted:
            raise RuntimeError(
                f"prefect-modal could not submit task {task.name!r} from this sandbox: "
                f"{accepted['refused']}"
            )
        return accepted["future"]

    def _read(self, fd: int) -> None:
        import pickle

        reader = self._remote.FrameReader(self._nonce)
        with open(fd, "rb", buffering=0) as stream:
            while True:
                chunk = stream.read(65536)
                if not chunk:
                    break
                for kind, data in reader.feed(chunk.decode("ascii", "replace")):
                    if kind == "REPLY":
                        self._dispatch(*pickle.loads(data))

    def _dispatch(self, request: int, event: str, payload: Any) -> None:
        if event == "done":
            future = self._futures.pop(request, None)
            if future is not None:
                future._finish(payload)
            return
        with self._lock:
            accepted = self._waiting.pop(request, None)
        if accepted is None:
            return
        if event == "accepted":
            future = _remote_future(payload)
            self._futures[request] = future
            accepted["future"] = future
        else:
            accepted["refused"] = str(payload)
        accepted["event"].set()


def _to_refs(value: Any) -> Any:
    """Futures among the parameters (top level and inside lists, tuples, dicts) as references."""
    from prefect.futures import PrefectFuture

    if isinstance(value, PrefectFuture):
        return (FUTURE_REF, str(value.task_run_id))
    if isinstance(value, dict):
        return {k: _to_refs(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_refs(v) for v in value) if type(value) in (list, tuple) else value
    return value


def _remote_future(task_run_id: Any) -> Any:
    """What a nested submit returns: the type ThreadPoolTaskRunner returns, a
    `PrefectConcurrentFuture`, whose wrapped future gets the child's final state
    when the flow process reports it."""
    import concurrent.futures

    from prefect.futures import PrefectConcurrentFuture
    from prefect.states import Completed, Crashed, Failed, Pending, State

    class RemoteFuture(PrefectConcurrentFuture[Any]):
        """A child task run submitted by the flow process on this sandbox's behalf."""

        def __init__(self, task_run_id: Any) -> None:
            super().__init__(task_run_id, concurrent.futures.Future())

        @property
        def state(self) -> State:
            if self._final_state is not None:
                return self._final_state
            if not self._wrapped_future.done():
                return Pending()  # the API that knows better is out of reach
            self.wait()
            assert self._final_state is not None
            return self._final_state

        def _finish(self, outcome: dict[str, Any]) -> None:
            message = outcome.get("message")
            state: State
            if "value" in outcome:
                state = Completed(data=outcome["value"], message=message)
            else:
                exc = outcome.get("exception")
                if not isinstance(exc, BaseException):
                    exc = RuntimeError(message or "the task run failed")
                kind = Crashed if outcome.get("type") == "CRASHED" else Failed
                state = kind(data=exc, message=message)
            self._wrapped_future.set_result(state)  # type: ignore[arg-type]

    return RemoteFuture(task_run_id)


def _sandbox_task_runner(proxy: Proxy) -> Any:
    from prefect.task_runners import TaskRunner

    class SandboxTaskRunner(TaskRunner[Any]):
        """The flow's task runner as seen from a sandbox: submits through the flow process."""

        @property
        def name(self) -> str:
            return "modal-sandbox"

        def duplicate(self) -> SandboxTaskRunner:
            return self

        def submit(
            self, task: Any, parameters: Any, wait_for: Any = None, dependencies: Any = None
        ) -> Any:
            return proxy.submit(task, parameters, wait_for, "submit")

    runner = SandboxTaskRunner()
    runner._started = True
    return runner


def _proxy_direct_calls(stack: ExitStack, proxy: Proxy) -> None:
    """`child(x)` inside a sandboxed task: a child task run, submitted by the flow process,
    whose result (or state) this call returns, as Prefect's nested call does."""
    import asyncio

    import prefect.task_engine as engine

    original = engine.run_task

    def run_task(
        task: Any,
        task_run_id: Any = None,
        task_run: Any = None,
        parameters: Any = None,
        wait_for: Any = None,
        return_type: str = "result",
        **kwargs: Any,
    ) -> Any:
        def call() -> Any:
            future = proxy.submit(task, parameters or {}, wait_for, "call")
            if return_type == "state":
                future.wait()
                return future.state
            return future.result()

        if getattr(task, "isasync", False):
            return asyncio.to_thread(call)
        return call()

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


def enter(
    data: dict[str, Any], emit_record: Any, send: Any, replies_fd: int, nonce: str, bootstrap: Any
) -> ExitStack:
    """Enter the run context described by `data`; close the returned stack to leave it.

    `send(kind, bytes)` writes a frame on the private channel, `replies_fd` reads
    the flow process's answers, `bootstrap` is the running `remote.py` (its frame helpers).
    """
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
        proxy = Proxy(send, replies_fd, nonce, bootstrap)
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
                    task_runner=_sandbox_task_runner(proxy),
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
        _proxy_direct_calls(stack, proxy)
    except BaseException:
        stack.close()
        raise
    return stack
