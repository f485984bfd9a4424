"""A Modal Volume as a work pool's bundle storage: Prefect's upload and execute steps.

Prefect ships a flow run to a worker's infrastructure as a *bundle*: the pool's
``storage_configuration`` names an upload step (run where the flow is
submitted, ``python -m <module> --<arg> <value> ... --key KEY FILE``) and an
execution step (the infrastructure's command, ``python -m <module> ... --key
KEY``).  prefect-aws and prefect-gcp provide them for buckets; these provide
them for a Modal Volume, so ``submit_to_work_pool`` and a separate ``prefect
worker start --pool P`` need nothing but Modal:

* `prefect_modal.bundles.upload` writes the bundle file to the volume through
  the Volume API (under ``<base_path>/<key>``);
* `prefect_modal.bundles.execute` runs in the sandbox, where the worker has
  mounted the volume (`volume_names`), copies the bundle and its included
  files' zip out of it and hands them to Prefect's own
  ``prefect.bundles.execute``.

`storage_steps` builds the pair the way Prefect's ``work-pool storage
configure`` does; ``prefect-modal pool storage configure POOL --volume V`` sets
them on a pool.
"""

from __future__ import annotations

from typing import Any

UPLOAD_STEP = "prefect_modal.bundles.upload"
EXECUTE_STEP = "prefect_modal.bundles.execute"
#: Folder of the volume that holds bundles unless the pool says otherwise.
DEFAULT_BASE_PATH = "bundles"
#: The steps run with the interpreter on PATH, which must have prefect-modal (the
#: caller's environment; the worker's default image).  Prefect's `requires` form
#: (`uv run --with prefect-modal`) would install it from an index instead.
DEFAULT_LAUNCHER = ["python"]


def storage_steps(
    volume: str,
    base_path: str = DEFAULT_BASE_PATH,
    credentials_block: str | None = None,
    upload_launcher: list[str] | None = None,
    execution_launcher: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (upload, execution) steps of a pool whose bundles live on `volume`."""
    args: dict[str, Any] = {"volume": volume, "base_path": base_path}
    upload = dict(args)
    if credentials_block:
        upload["modal_credentials_block_name"] = credentials_block
    upload["launcher"] = list(upload_launcher or DEFAULT_LAUNCHER)
    execute = dict(args, launcher=list(execution_launcher or DEFAULT_LAUNCHER))
    return {UPLOAD_STEP: upload}, {EXECUTE_STEP: execute}


def volume_names(work_pool: Any) -> list[str]:
    """The volumes a pool's bundle execution step reads, which its sandboxes mount."""
    config = getattr(work_pool, "storage_configuration", None)
    step = getattr(config, "bundle_execution_step", None) or {}
    names = []
    for fqn, args in step.items():
        if fqn.startswith("prefect_modal.") and isinstance(args, dict) and args.get("volume"):
            names.append(str(args["volume"]))
    return names


__all__ = ["DEFAULT_BASE_PATH", "EXECUTE_STEP", "UPLOAD_STEP", "storage_steps", "volume_names"]
