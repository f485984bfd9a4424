"""prefect-modal: run Prefect flows and tasks in Modal Sandboxes.

Per-step mode: ``@flow(task_runner=ModalTaskRunner())`` runs each task call in
its own sandbox.  Pipeline mode: a work pool of type ``modal`` runs each flow
run whole in one sandbox.  With no Modal credentials, both use the local
Modal-compatible server in :mod:`prefect_modal.local`.
"""

from prefect_modal.credentials import ModalCredentials
from prefect_modal.decorators import modal
from prefect_modal.options import modal_options
from prefect_modal.sessions import ModalSandboxConfig, SandboxSession, SandboxSnapshot
from prefect_modal.settings import SandboxSpec
from prefect_modal.storage import ModalVolume
from prefect_modal.task_runner import ModalTaskRunner
from prefect_modal.worker import ModalWorker

__all__ = [
    "ModalCredentials",
    "ModalSandboxConfig",
    "ModalTaskRunner",
    "ModalVolume",
    "ModalWorker",
    "SandboxSession",
    "SandboxSnapshot",
    "SandboxSpec",
    "modal",
    "modal_options",
]
__version__ = "0.1.0"
