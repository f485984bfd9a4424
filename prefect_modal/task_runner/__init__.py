"""Per-step mode: `ModalTaskRunner` runs each task call in a Modal sandbox.

The Prefect task engine stays in the flow's process; only the call travels.

* `runner` - `ModalTaskRunner`, Prefect's task runner interface;
* `call` - one task call in one sandbox (`SandboxCall`) and the errors it ends with;
* `pickling` - the call's payload: user code by value, plain containers;
* `warm` - warm sandboxes reused within a flow run; `warm_records` - their artifacts;
* `options` - `modal_options`, per-task settings;
* `result_refs` - results too large for the output stream, by reference on a volume;
* `run_context` - the Prefect run context that travels with a call;
  `nested` - submits made inside a sandbox, run back in the flow process;
* `interrupts` - Ctrl-C of the flow process ends its sandboxes;
* `artifact_writer` - sandbox records written in the background, in order;
* `remote`, `remote_context` - run INSIDE the sandbox (standard library only).
"""

from prefect_modal.task_runner.runner import ModalTaskRunner

__all__ = ["ModalTaskRunner"]
