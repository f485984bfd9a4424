"""Ad-hoc flow runs: a called flow (`@modal(work_pool=...)`) run whole in one sandbox.

Prefect's `BaseWorker.submit` ships a flow as a *bundle* (the cloudpickled flow,
its context and flow run, made by `create_bundle_for_flow_run`) through the work
pool's bundle storage, a bucket.  A Modal user has no bucket and should not
need one just to call a flow, so when the pool has no bundle storage the bundle
goes into the sandbox directly, on its stdin: the sandbox's command is a small
bootstrap (`BOOTSTRAP`) that checks the image's Prefect, reads the framed
bundle (and the zip of ``include_files``), writes them to a temporary folder
and replaces itself with Prefect's own ``python -m prefect.bundles.execute``.
With bundle storage on the pool, Prefect's upload and execution steps are used
as they are (a `ModalVolume` pool uses ``prefect_modal.bundles``).

The value comes back through result storage: the flow's own, else the pool's
default, else Prefect's default when it is remote, else the saved
`ModalVolume` block ``prefect-modal-results``.  A `ModalVolume` used for results
or bundles is mounted into the sandbox, so the sandbox needs no Modal token.

The checks in `preflight` run before any flow run or sandbox exists, each
error naming the command that fixes it.
"""

from __future__ import annotations

import copy
import json
import shlex
import struct
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import prefect

from prefect_modal.core.errors import PrefectModalError

if TYPE_CHECKING:
    import logging
    from uuid import UUID

    import anyio.abc
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.flows import Flow
    from prefect.logging.loggers import LoggingAdapter, PrefectLogAdapter

    from prefect_modal.worker.job_configuration import ModalWorkerJobConfiguration


class ModalWorker(Protocol):
    """What an ad-hoc call uses of its `ModalWorker`: a protocol, so that this
    module need not import the worker, which calls it."""

    name: str
    backend_id: UUID | None
    job_configuration: type[ModalWorkerJobConfiguration]
    stdin_payloads: dict[UUID, bytes]
    _logger: logging.Logger | LoggingAdapter

    @property
    def client(self) -> PrefectClient: ...

    @property
    def work_pool(self) -> WorkPool: ...

    def get_flow_run_logger(self, flow_run: FlowRun) -> PrefectLogAdapter: ...

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ModalWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> Any: ...

    async def _propose_crashed_state(
        self, flow_run: FlowRun, message: str, client: PrefectClient | None = None
    ) -> None: ...


#: Exit code of the bootstrap when the image cannot run the bundle (EX_CONFIG).
EXIT_IMAGE = 78
EXECUTE_MODULE = "prefect.bundles.execute"

#: Runs in the sandbox with `python -c`: no import of prefect_modal, and none of
#: Prefect before the version check.  argv: caller's Prefect version, the
#: execution launcher as JSON (empty: this interpreter), the image fix hint.
BOOTSTRAP = r"""
import json, os, struct, sys, tempfile
want, launcher, hint = sys.argv[1], json.loads(sys.argv[2] or "[]"), sys.argv[3]
def stop(msg):
    sys.stderr.write("prefect-modal: " + msg + "\n" + hint + "\n")
    sys.stderr.flush()
    sys.exit(78)
try:
    import prefect
    have = str(prefect.__version__)
except Exception as exc:
    stop("the sandbox's image has no Prefect (%s: %s); the caller runs prefect %s."
         % (type(exc).__name__, exc, want))
if have.split(".")[:2] != want.split(".")[:2]:
    stop("the sandbox's image has prefect %s but the caller runs prefect %s; their minor "
         "versions must match to run the caller's bundle." % (have, want))
src = sys.stdin.buffer
def take():
    head = src.read(8)
    if len(head) != 8:
        stop("the flow run's bundle did not arrive on stdin.")
    size = struct.unpack(">Q", head)[0]
    data = src.read(size)
    if len(data) != size:
        stop("the flow run's bundle arrived cut short (%d of %d bytes)." % (len(data), size))
    return data
folder = tempfile.mkdtemp(prefix="prefect-bundle-")
meta = json.loads(take())
bundle_path = os.path.join(folder, meta["key"])
with open(bundle_path, "wb") as f:
    f.write(take())
if meta.get("files_key"):
    zpath = os.path.join(folder, meta["files_key"])
    os.makedirs(os.path.dirname(zpath), exist_ok=True)
    with open(zpath, "wb") as f:
        f.write(take())
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
argv = (launcher or [sys.executable]) + ["-m", "prefect.bundles.execute", "--key", bundle_path]
os.execvp(argv[0], argv)
"""


class AdhocRunError(PrefectModalError, RuntimeError):
    """A called flow cannot run on the pool; the message says the command that fixes it."""


class WorkPoolNotFound(AdhocRunError):
    pass


class WrongWorkPoolType(AdhocRunError):
    pass


class FlowNotBundleable(AdhocRunError):
    pass


def image_hint() -> str:
    version = prefect.__version__
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"Fix: leave the job variable `image` empty (the default image gets prefect=={version}), "
        f"or add prefect to your image: pip_packages=['prefect=={version}'] "
        f"(e.g. @modal(work_pool=..., pip_packages=['prefect=={version}'])), "
        f"or image='prefecthq/prefect:{version}-python{py}'."
    )


def bootstrap_command(launcher: list[str] | None) -> str:
    """The sandbox's command for a bundle sent on stdin."""
    return shlex.join(
        ["python", "-c", BOOTSTRAP, prefect.__version__, json.dumps(launcher or []), image_hint()]
    )


def frame(bundle: dict[str, Any], key: str, zip_path: Path | None) -> bytes:
    """The bytes the bootstrap reads: header, bundle, and the included files' zip."""
    files_key = bundle.get("files_key") if zip_path else None
    parts = [json.dumps({"key": key, "files_key": files_key}).encode(), json.dumps(bundle).encode()]
    if files_key and zip_path:
        parts.append(zip_path.read_bytes())
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


# -- checks before anything is created ----------------------------------------------


def check_pool(pool_name: str, pool: WorkPool | None) -> None:
    """The pool must exist and be of type `modal`."""
    if pool is None:
        raise WorkPoolNotFound(
            f"Work pool {pool_name!r} does not exist. Create it with:\n"
            f"    prefect work-pool create {shlex.quote(pool_name)} --type modal"
        )
    if pool.type != "modal":
        raise WrongWorkPoolType(
            f"Work pool {pool_name!r} is of type {pool.type!r}, but @modal needs a pool of "
            f"type 'modal'. Create one and pass its name:\n"
            f"    prefect work-pool create {shlex.quote(pool_name + '-modal')} --type modal\n"
            f"and use @modal(work_pool={pool_name + '-modal'!r})."
        )


def check_bundleable(flow: Flow[Any, Any]) -> None:
    """Pickle the flow as Prefect's bundle does, so a failure comes before any run."""
    import cloudpickle

    try:
        from prefect.bundles import _pickle_local_modules_by_value
    except ImportError:  # pragma: no cover - older Prefect
        _pickle_local_modules_by_value = None  # type: ignore[assignment]
    try:
        if _pickle_local_modules_by_value is not None:
            with _pickle_local_modules_by_value(flow):
                cloudpickle.dumps(flow)
        else:  # pragma: no cover
            cloudpickle.dumps(flow)
    except Exception as exc:
        where = _defined_in(flow)
        raise FlowNotBundleable(
            f"Flow {flow.name!r} ({where}) cannot be bundled to run on Modal: "
            f"{type(exc).__name__}: {exc}. A bundle is the pickled flow function: create what "
            "cannot be pickled (open files, locks, clients, connections) inside the flow, "
            "not at module level or in a closure. Or run it from its source file with a "
            "deployment instead:\n"
            f"    prefect deploy {where}:{flow.fn.__name__} --pool <your modal pool>"
        ) from None


def _defined_in(flow: Flow[Any, Any]) -> str:
    import inspect

    try:
        return str(Path(inspect.getfile(flow.fn)).resolve())
    except (TypeError, OSError):
        return "defined interactively"


async def read_pool(pool_name: str) -> WorkPool | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_work_pool(pool_name)
        except ObjectNotFound:
            return None


async def preflight(flow: Flow[Any, Any], pool_name: str, job_variables: dict[str, Any]) -> None:
    """Every check that needs no flow run: pool, job variables, bundling."""
    from prefect_modal.worker.job_configuration import ModalWorkerJobConfiguration

    pool = await read_pool(pool_name)
    check_pool(pool_name, pool)
    assert pool is not None
    # A bad job variable (gpu="H1000") fails here, naming it, before a run exists.
    await ModalWorkerJobConfiguration.from_template_and_values(
        base_job_template=pool.base_job_template, values=dict(job_variables)
    )
    check_bundleable(flow)


# -- the submission ---------------------------------------------------------------------


async def result_storage_for(worker: ModalWorker, flow: Flow[Any, Any]) -> Any:
    """The storage the run's value is written to, or None if the flow already has one."""
    from prefect.results import (
        _aget_default_result_storage,
        _DefaultResultStorageSource,
        _result_storage_is_configured_for_remote_retrieval,
        aresolve_result_storage,
        get_result_store,
    )

    from prefect_modal.storage import default_result_storage

    if _result_storage_is_configured_for_remote_retrieval(
        flow.result_storage, get_result_store().result_storage
    ):
        return None
    block_id = worker.work_pool.storage_configuration.default_result_storage_block_id
    if block_id is not None:
        return await aresolve_result_storage(block_id)
    default = await _aget_default_result_storage()
    if default.source is not _DefaultResultStorageSource.LOCAL_STORAGE_PATH:
        return default.storage
    storage = await default_result_storage()
    worker._logger.info(
        "Flow %r names no result storage and pool %r has no default: its value goes to "
        "the Modal Volume %r (block 'modal-volume/%s'). Choose another with the flow's "
        "result_storage or the pool's default result storage.",
        flow.name,
        worker.work_pool.name,
        storage.volume_name,
        "prefect-modal-results",
    )
    return storage


def volumes_to_mount(flow: Flow[Any, Any], pool: WorkPool) -> list[str]:
    """Names of the `ModalVolume`s the sandbox reads or writes: results and bundles."""
    from prefect_modal.storage import ModalVolume

    names = []
    if isinstance(flow.result_storage, ModalVolume):
        names.append(flow.result_storage.volume_name)
    from prefect_modal.bundles import volume_names

    names += volume_names(pool)
    return list(dict.fromkeys(names))


async def submit_adhoc_run(
    worker: ModalWorker,
    flow: Flow[Any, Any],
    parameters: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
    task_status: anyio.abc.TaskStatus[FlowRun] | None = None,
    flow_run: FlowRun | None = None,
) -> None:
    """`ModalWorker._submit_adhoc_run`: create the run, start its sandbox, feed it the bundle."""
    from prefect._internal.launchers import get_launcher_for_side, resolve_bundle_step_with_launcher
    from prefect.bundles import (
        aupload_bundle_to_storage,
        convert_step_to_command,
        create_bundle_for_flow_run,
    )
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.context import FlowRunContext, TagsContext
    from prefect.states import Pending
    from prefect.tasks import Task

    pool = copy.deepcopy(worker.work_pool)
    check_pool(pool.name, pool)
    storage = await result_storage_for(worker, flow)
    if storage is not None:
        flow = flow.with_options(result_storage=storage, persist_result=True)

    launcher = getattr(flow, "launcher", None)
    steps = pool.storage_configuration
    bundle_key = str(uuid.uuid4())
    upload_command: list[str] | None = None
    upload_step: dict[str, Any] | None = None
    if steps.bundle_upload_step is None or steps.bundle_execution_step is None:
        execution = get_launcher_for_side(launcher, "execution")
        if execution is None:
            # The sandbox's interpreter runs the bundle: the image holds the
            # packages, so Prefect's `uv pip freeze` snapshot would go unused.
            flow = _with_execution_launcher(flow, ["python"])
        command = bootstrap_command(execution)
    else:
        upload_step = resolve_bundle_step_with_launcher(
            steps.bundle_upload_step, launcher, "upload"
        )
        execute_step = resolve_bundle_step_with_launcher(
            steps.bundle_execution_step, launcher, "execution"
        )
        step_args: dict[str, Any] = dict(next(iter(execute_step.values())))
        step_launcher = step_args.get("launcher")
        if step_launcher and get_launcher_for_side(launcher, "execution") is None:
            # The pool's step runs the bundle with its own interpreter (our steps use
            # the image's `python`): Prefect then skips its `uv pip freeze` snapshot.
            flow = _with_execution_launcher(flow, list(step_launcher))
        upload_command = convert_step_to_command(upload_step, bundle_key, quiet=True)
        command = shlex.join(convert_step_to_command(execute_step, bundle_key))
    job_variables = dict(job_variables or {}) | {"command": command}
    parameters = parameters or {}

    if flow_run is None:
        parent_task_run = None
        if flow_run_ctx := FlowRunContext.get():
            parent_task = Task[Any, Any](name=flow.name, fn=flow.fn, version=flow.version)
            parent_task_run = await parent_task.create_run(
                flow_run_context=flow_run_ctx, parameters=parameters
            )
        flow_run = await worker.client.create_flow_run(
            flow,
            parameters=flow.serialize_parameters(parameters),
            state=Pending(),
            job_variables=job_variables,
            work_pool_name=pool.name,
            tags=TagsContext.get().current_tags,
            parent_task_run_id=getattr(parent_task_run, "id", None),
        )
    else:
        await worker.client.set_flow_run_state(
            flow_run.id, Pending(message="Retrying on Modal"), force=True
        )
        flow_run = await worker.client.read_flow_run(flow_run.id)
    if task_status is not None:
        task_status.started(flow_run)

    logger = worker.get_flow_run_logger(flow_run)
    try:
        configuration: ModalWorkerJobConfiguration
        configuration = await worker.job_configuration.from_template_and_values(
            base_job_template=pool.base_job_template,
            values=job_variables,
            client=worker.client,
        )
        configuration.mount_storage_volumes(volumes_to_mount(flow, pool))
        configuration.prepare_for_flow_run(
            flow_run=flow_run,
            flow=APIFlow(id=flow_run.flow_id, name=flow.name, labels={}),
            work_pool=pool,
            worker_name=worker.name,
            worker_id=worker.backend_id,
        )
        # The engine's own command, not the mode's: the bundle carries the flow.
        configuration.command = command
        if configuration.mode == "per_step":
            flow = _with_per_step_runner(flow, configuration)
        created = create_bundle_for_flow_run(flow=flow, flow_run=flow_run)
        _drop_host_ca_file(created["bundle"])
    except Exception as exc:
        logger.error("Flow run %s could not be prepared: %s", flow_run.id, exc)
        await worker._propose_crashed_state(
            flow_run, f"Flow run could not be prepared for Modal: {type(exc).__name__}: {exc}"
        )
        return

    bundle, zip_path = created["bundle"], created["zip_path"]
    try:
        if upload_command is not None:
            await aupload_bundle_to_storage(
                bundle, bundle_key, upload_command, zip_path=zip_path, upload_step=upload_step
            )
        else:
            worker.stdin_payloads[flow_run.id] = frame(dict(bundle), bundle_key, zip_path)
    except Exception as exc:
        logger.error("The bundle of flow run %s could not be uploaded: %s", flow_run.id, exc)
        await worker._propose_crashed_state(
            flow_run, f"The flow run's bundle could not be uploaded: {exc}"
        )
        return
    finally:
        if zip_path:
            import shutil

            zip_path.unlink(missing_ok=True)
            if zip_path.parent.name.startswith("prefect-zip-"):
                shutil.rmtree(zip_path.parent, ignore_errors=True)

    try:
        # `run` follows the sandbox to its end and marks the run Crashed (exit
        # code and last lines) if it ended without the engine reporting.
        await worker.run(flow_run, configuration)
    except Exception as exc:
        logger.exception("Failed to run flow run %s on Modal.", flow_run.id)
        await worker._propose_crashed_state(
            flow_run, f"Flow run could not be started on Modal: {type(exc).__name__}: {exc}"
        )
    finally:
        worker.stdin_payloads.pop(flow_run.id, None)


def _with_execution_launcher(flow: Flow[Any, Any], command: list[str]) -> Flow[Any, Any]:
    from prefect._internal.launchers import normalize_launcher
    from prefect.flows import InfrastructureBoundFlow

    launcher = dict(normalize_launcher(getattr(flow, "launcher", None)) or {})
    launcher["execution"] = command
    if isinstance(flow, InfrastructureBoundFlow):
        return flow.with_options(launcher=launcher)  # type: ignore[arg-type]
    new = copy.copy(flow)
    new.launcher = launcher  # type: ignore[attr-defined]
    return new


def _drop_host_ca_file(bundle: Any) -> None:
    """Take the caller's CA file out of the bundle's settings.

    The bundle carries the caller's Prefect settings; ``api.ssl_cert_file`` (which
    Prefect takes from ``SSL_CERT_FILE``, set by `prefect-modal local serve`'s
    variables or a company's TLS set-up) is a path on the caller's machine.  The
    sandbox has no such file, and Prefect's client would fail to start on it; the
    sandbox reaches the API with its own trust store.
    """
    from prefect.bundles import _deserialize_bundle_object, _serialize_bundle_object

    context = _deserialize_bundle_object(bundle["context"])
    api = ((context or {}).get("settings_context") or {}).get("settings", {}).get("api")
    if isinstance(api, dict) and api.pop("ssl_cert_file", None) is not None:
        bundle["context"] = _serialize_bundle_object(context)


def _with_per_step_runner(flow: Flow[Any, Any], configuration: Any) -> Flow[Any, Any]:
    """per_step mode: the flow's task runner becomes the pool's `ModalTaskRunner`,
    as ``python -m prefect_modal.per_step`` does for deployments."""
    from prefect_modal.worker.per_step import runner_from_env

    plain, secret = configuration.sandbox_env({})
    runner = runner_from_env({**plain, **secret}, flow_runner=flow.task_runner)
    return flow.with_options(task_runner=runner)  # type: ignore[arg-type]
