"""Pipeline mode: `ModalWorker`, the ``modal`` work pool's worker.

* `worker` - `ModalWorker`: one sandbox per flow run;
* `job_configuration` - the pool's job variables and what a job gets from them;
* `reconcile` - flow runs whose sandbox died, sandboxes whose run was cancelled;
* `inflight` - the runs this worker is following;
* `adhoc` - ``@modal`` calls submitted through the worker in the caller's process;
* `per_step` - the flow run's entry point in the worker's ``per_step`` mode.
"""

from prefect_modal.worker.worker import ModalWorker

__all__ = ["ModalWorker"]
