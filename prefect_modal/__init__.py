"""prefect-modal: run Prefect flows and tasks in Modal Sandboxes.

Per-step mode: ``@flow(task_runner=ModalTaskRunner())`` runs each task call in
its own sandbox.  Pipeline mode: a work pool of type ``modal`` runs each flow
run whole in one sandbox.  With no Modal credentials, both use the local
Modal-compatible server in :mod:`prefect_modal.local`.

The package by role (each folder's docstring is its map):

* `core` - what every mode shares: the spec, the one module that calls the
  modal SDK, credentials, targets, artifacts, cancellation, the error root;
* `task_runner` - per-step mode; `worker` - pipeline mode (and the worker's
  per_step entry point); `sessions` - sandbox sessions; `bundles` - bundle
  storage steps on a Modal Volume; `cli` - ``prefect-modal``;
* `local` - the local Modal server (it imports nothing of the adapter).

Public: the names below, and the modules ``prefect_modal.decorators``,
``storage``, ``status``, ``events``, ``sessions``, ``bundles.*``, ``local``,
``task_runner`` (`ModalTaskRunner`) and ``worker`` (`ModalWorker`).  Every
other module is private: its names may move between releases.
"""

from prefect_modal import _moved
from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.errors import PrefectModalError
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.decorators import modal
from prefect_modal.sessions import ModalSandboxConfig, SandboxSession, SandboxSnapshot
from prefect_modal.storage import ModalVolume
from prefect_modal.task_runner import ModalTaskRunner
from prefect_modal.task_runner.options import modal_options
from prefect_modal.worker import ModalWorker

_moved.install()

__all__ = [
    "ModalCredentials",
    "ModalSandboxConfig",
    "ModalTaskRunner",
    "ModalVolume",
    "ModalWorker",
    "PrefectModalError",
    "SandboxSession",
    "SandboxSnapshot",
    "SandboxSpec",
    "modal",
    "modal_options",
]
__version__ = "0.1.0"
