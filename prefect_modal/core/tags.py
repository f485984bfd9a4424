"""The tag keys every prefect-modal sandbox carries, in one place.

Tags are how a restarted worker, the CLI or a cancel hook finds the sandboxes
of a run on Modal when the process that started them is gone, so the task
runner and the worker must write the same keys, and readers must look for
them.  Values are ids as strings.
"""

FLOW_RUN = "prefect.flow-run-id"
TASK_RUN = "prefect.task-run-id"
TASK_NAME = "prefect.task-name"
ATTEMPT = "prefect.attempt"
DEPLOYMENT = "prefect.deployment-id"
WORK_POOL = "prefect.work-pool-id"
WORKER = "prefect.worker-name"
#: "per_step" or "pipeline": which mode started the sandbox.
MODE = "prefect-modal.mode"
#: "1" on a warm sandbox: it serves many task runs of one flow run, one at a time.
WARM = "prefect-modal.warm"
#: The worker's sandboxes: "flow-run" (the run itself) or a task's.
ROLE = "prefect-modal.role"
#: The role of a flow run's own sandbox (the worker's; a task's has another).
ROLE_FLOW_RUN = "flow-run"
