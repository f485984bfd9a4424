"""Where the modules of 0.1.0's flat layout went: their old paths import, for one release.

Pickles made before the move name their classes by the old module (a task
result holding a `SandboxSpec` names ``prefect_modal.settings``), and so may
users' imports.  A finder on ``sys.meta_path`` hands the new module over for
each old name, with a `DeprecationWarning`; nothing is copied, so a class
is the same object under either path.  Public names are imported from
``prefect_modal`` (or the documented modules that stayed); this table goes
in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: Old module path -> where it lives now.
MOVED: dict[str, str] = {
    f"prefect_modal.{old}": f"prefect_modal.{new}"
    for old, new in {
        "settings": "core.spec",
        "sandboxes": "core.modal_api",
        "resources": "core.resources",
        "tags": "core.tags",
        "targets": "core.targets",
        "credentials": "core.credentials",
        "packages": "core.packages",
        "artifacts": "core.artifacts",
        "pricing": "core.pricing",
        "sandbox_call": "task_runner.call",
        "warm": "task_runner.warm",
        "warm_records": "task_runner.warm_records",
        "options": "task_runner.options",
        "result_refs": "task_runner.result_refs",
        "run_context": "task_runner.run_context",
        "nested": "task_runner.nested",
        "interrupts": "task_runner.interrupts",
        "remote": "task_runner.remote",
        "remote_context": "task_runner.remote_context",
        "artifact_writer": "task_runner.artifact_writer",
        "job_configuration": "worker.job_configuration",
        "reconcile": "worker.reconcile",
        "inflight": "worker.inflight",
        "adhoc": "worker.adhoc",
        "pool_cli": "cli.pool",
        "demo": "cli.demo",
        "services": "cli.services",
    }.items()
}


class _MovedLoader(importlib.abc.Loader):
    """Loads an old path by importing its new module and standing it in for the old name."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} moved to {self.new}; import it from there "
            "(or its public names from prefect_modal). The old path goes in a later release.",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns what sys.modules holds under the name once
        # this returns: the new module itself, untouched (its __spec__ stays its own).
        sys.modules[module.__name__] = importlib.import_module(self.new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _MovedLoader(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (importing ``prefect_modal`` does)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
