"""The tag keys every prefect-modal sandbox carries, in one place.

Tags are how a restarted worker, the CLI or a cancel hook finds the sandboxes
of a run on Modal when the process that started them is gone, so the task
runner and the worker must write the same keys, and readers must look for
them.  Values are ids as strings, or names made valid by `tag_value`.
"""

import re
from collections.abc import Mapping

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

#: Modal's rule for tag keys and values: 1 to 63 of ``[A-Za-z0-9._-]``
#: (``modal/_utils/name_utils.py``, ``check_tag_dict``, which the client applies to
#: App tags; Modal's server holds sandbox tags to it).
TAG_MAX_CHARS = 63
_NOT_IN_A_TAG = re.compile(r"[^A-Za-z0-9._-]+")


def tag_value(text: str) -> str:
    """`text` as a valid tag value: each run of other characters becomes one '-', cut to
    63.  Task and worker names may hold anything (the default worker name has a space);
    the artifact keeps the original."""
    return _NOT_IN_A_TAG.sub("-", text).strip("-")[:TAG_MAX_CHARS] or "-"


def valid_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """`tags` with every value made valid (our keys are valid as written)."""
    return {key: tag_value(value) for key, value in tags.items()}
