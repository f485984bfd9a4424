"""The flow process's end of task calls and submits made inside a sandboxed task.

A sandbox cannot run Prefect's engine (no API key, no route to the API), so a
`child.submit(x)`, `child.map(...)` or `child(x)` in a sandboxed task arrives
here as a SUBMIT frame on the call's private channel (see `remote_context.Proxy`).
It is submitted through the flow's own runner, in a copy of the parent's
engine-thread context: Prefect then records the child as a task run of the
flow run with the parent task run as its parent, and the child gets its own
sandbox, retries and result handling, like any submitted task.  The replies
("accepted" with the child's task run id, then "done" with its outcome) go back
on the sandbox's stdin.

A parent waiting for its child keeps its own sandbox slot: with
`max_parallelism` slots all held by waiting parents, children queue until
one frees (as threads do under ThreadPoolTaskRunner's `max_workers`).
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable
from contextvars import Context
from typing import Any

import cloudpickle

from prefect_modal.task_runner import remote

#: How a future inside submitted parameters travels (see `remote_context._to_refs`).
FUTURE_REF = "__prefect_modal_future__"

logger = logging.getLogger("prefect_modal.task_runner")


class NestedCalls:
    """Runs one sandbox's nested submits through `submit` and answers through `reply`."""

    def __init__(
        self,
        submit: Callable[..., Any],
        reply: Callable[[bytes], None],
        nonce: str,
        context: Context,
        run_logger: Any,
    ) -> None:
        self._submit = submit
        self._reply = reply
        self._nonce = nonce
        self._context = context
        self._run_logger = run_logger
        self._children: dict[str, Any] = {}
        self._lock = threading.Lock()

    def on_frame(self, kind: str, body: bytes) -> None:
        """Called for each frame read live from the sandbox; SUBMITs start a thread each."""
        if kind != "SUBMIT":
            return
        thread = threading.Thread(
            target=self._context.copy().run,
            args=(self._handle, body),
            name="prefect-modal-nested",
            daemon=True,
        )
        thread.start()

    def _send(self, request: int, event: str, payload: Any) -> None:
        try:
            data = cloudpickle.dumps((request, event, payload), protocol=pickle.DEFAULT_PROTOCOL)
        except Exception as exc:  # the child's value or exception cannot travel back
            data = cloudpickle.dumps(
                (
                    request,
                    event,
                    {
                        "type": "FAILED",
                        "message": f"the child's outcome could not be pickled: {exc}",
                        "exception": RuntimeError(
                            f"the child's outcome could not be pickled: {exc}"
                        ),
                    },
                )
            )
        self._reply(remote.encode_frame(self._nonce, "REPLY", data).encode("ascii"))

    def _from_refs(self, value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == FUTURE_REF:
            with self._lock:
                return self._children.get(value[1], value)
        if isinstance(value, dict):
            return {k: self._from_refs(v) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._from_refs(v) for v in value)
        return value

    def _handle(self, body: bytes) -> None:
        try:
            request, how, task, parameters, waits = cloudpickle.loads(body)
        except Exception as exc:
            logger.warning("prefect-modal: an unreadable nested submit was ignored: %s", exc)
            return
        try:
            with self._lock:
                wait_for = [self._children[w] for w in map(str, waits) if w in self._children]
            future = self._submit(task, self._from_refs(parameters), wait_for or None)
        except Exception as exc:
            self._send(request, "refused", f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._children[str(future.task_run_id)] = future
        self._run_logger.debug(
            "Nested %s of task %r from the sandbox: task run %s",
            "call" if how == "call" else "submit",
            task.name,
            future.task_run_id,
        )
        self._send(request, "accepted", future.task_run_id)
        future.wait()
        state = future.state
        outcome: dict[str, Any] = {
            "type": state.type.value,
            "name": state.name,
            "message": state.message,
        }
        try:
            if state.is_completed():
                outcome["value"] = future.result()
            else:
                outcome["exception"] = future.result(raise_on_failure=False)
        except Exception as exc:  # e.g. a result that cannot be read back
            outcome["exception"] = exc
        self._send(request, "done", outcome)
