"""The paths users, Prefect and stored pools reach us by, after the package moved into rooms.

Each path that must keep working (issue 21) has a test here: the face's
names, the ``prefect.collections`` entry point, the worker's and the task
runner's documented paths, the console script, the commands stored in work
pools (``python -m prefect_modal.per_step`` and the bundle steps), and the
0.1.0 module paths that pickles made before the move name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pickle
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import prefect_modal
from prefect_modal import PrefectModalError, SandboxSpec, _moved
from prefect_modal.bundles import EXECUTE_STEP, UPLOAD_STEP
from prefect_modal.task_runner import call
from prefect_modal.worker.job_configuration import PER_STEP_COMMAND

#: What ``from prefect_modal import ...`` offered before the move, and the error root.
FACE = [
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


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_face_hands_on_every_name_it_had_and_the_error_root() -> None:
    assert sorted(prefect_modal.__all__) == sorted([*FACE, "PrefectModalError"])
    for name in FACE:
        assert getattr(prefect_modal, name) is not None


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("prefect_modal.worker:ModalWorker", "ModalWorker"),
        ("prefect_modal.task_runner:ModalTaskRunner", "ModalTaskRunner"),
        ("prefect_modal.cli:app", None),
        ("prefect_modal.decorators:modal", "modal"),
        ("prefect_modal.storage:ModalVolume", "ModalVolume"),
        ("prefect_modal.sessions:SandboxSession", "SandboxSession"),
    ],
)
def test_documented_paths_resolve(path: str, name: str | None) -> None:
    value = pkgutil.resolve_name(path)
    if name is not None:
        assert value is getattr(prefect_modal, name)
    else:
        assert callable(value)


def test_the_prefect_collections_entry_point_registers_the_modal_worker() -> None:
    from prefect.plugins import load_prefect_collections
    from prefect.workers.base import BaseWorker

    (entry,) = [
        e
        for e in importlib.metadata.entry_points(group="prefect.collections")
        if e.name == "prefect_modal"
    ]
    assert entry.load() is prefect_modal
    load_prefect_collections()
    assert BaseWorker.get_worker_class_from_type("modal") is prefect_modal.ModalWorker


def test_the_console_script_runs() -> None:
    (entry,) = [
        e
        for e in importlib.metadata.entry_points(group="console_scripts")
        if e.name == "prefect-modal"
    ]
    assert entry.value == "prefect_modal.cli:app"
    script = Path(sys.executable).with_name("prefect-modal")
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    for command in ("status", "demo", "local", "pool"):
        assert command in done.stdout


def test_python_m_per_step_runs_the_per_step_entry_point() -> None:
    """The command stored in pools' job templates: with no flow run id it is the
    entry point's own refusal, not an import error."""
    assert PER_STEP_COMMAND == "python -m prefect_modal.per_step"
    done = _run("-m", "prefect_modal.per_step", "not-a-uuid")
    assert done.returncode == 1
    assert "Invalid flow run id" in done.stdout + done.stderr
    assert "ModuleNotFoundError" not in done.stderr


@pytest.mark.parametrize("step", [UPLOAD_STEP, EXECUTE_STEP])
def test_the_bundle_steps_stored_in_pools_run(step: str) -> None:
    assert step in ("prefect_modal.bundles.upload", "prefect_modal.bundles.execute")
    done = _run("-m", step, "--help")
    assert done.returncode == 0, done.stderr
    assert "--volume" in done.stdout and "--key" in done.stdout


@pytest.mark.parametrize(("old", "new"), sorted(_moved.MOVED.items()))
def test_an_old_module_path_is_the_new_module_with_a_warning(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__ is not None and module.__spec__.name == new  # untouched
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def _as_if_pickled_before_the_move(value: object, new: str, old: str) -> bytes:
    """Protocol 2 names a class with a GLOBAL opcode, ``module\\nname\\n``: the bytes of a
    pickle made when the class lived at `old`."""
    data = pickle.dumps(value, protocol=2)
    assert f"c{new}\n".encode() in data
    return data.replace(f"c{new}\n".encode(), f"c{old}\n".encode())


def test_pickles_made_before_the_move_load() -> None:
    spec = SandboxSpec(cpu=2, memory="1GiB")
    data = _as_if_pickled_before_the_move(spec, "prefect_modal.core.spec", "prefect_modal.settings")
    assert pickle.loads(data) == spec
    error = call.SandboxCrashedError("exit 137")
    data = _as_if_pickled_before_the_move(
        error, "prefect_modal.task_runner.call", "prefect_modal.sandbox_call"
    )
    loaded = pickle.loads(data)
    assert type(loaded) is call.SandboxCrashedError and str(loaded) == "exit 137"


def _adapter_exceptions() -> list[type[BaseException]]:
    for info in pkgutil.walk_packages(prefect_modal.__path__, "prefect_modal."):
        if not info.name.startswith(("prefect_modal.local", "prefect_modal.per_step")):
            importlib.import_module(info.name)
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("prefect_modal.") or name.startswith("prefect_modal.local"):
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
            ):
                found.append(value)
    return found


def test_every_error_of_the_adapter_has_one_root() -> None:
    """Interrupt stand-ins stay BaseExceptions (see `core.errors`); all else is ours."""
    found = _adapter_exceptions()
    assert len(found) >= 20, [e.__name__ for e in found]
    outside = {e.__name__ for e in found if not issubclass(e, PrefectModalError)}
    interrupts = {"RemoteKeyboardInterrupt", "RemoteSystemExit", "Stopped"}
    assert outside == interrupts | {"RemoteTraceback"}  # the user's traceback text, a cause
    assert all(not issubclass(e, Exception) for e in found if e.__name__ in interrupts)
    # builtin bases are kept: a bad resource is still a ValueError
    from prefect_modal.core.resources import ResourceError

    assert issubclass(ResourceError, ValueError)
