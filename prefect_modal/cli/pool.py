"""`prefect-modal pool storage configure POOL --volume V`: a Modal Volume as a pool's storage.

The counterpart of Prefect's ``prefect work-pool storage configure s3 ...``: it
sets the pool's bundle upload and execution steps to `prefect_modal.bundles`
on the volume, and its default result storage to a `ModalVolume` block
(``default-<pool>-result-storage``, folder ``results`` of the same volume), so
``submit_to_work_pool``, a separate worker and ``.result()`` need only Modal.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prefect_modal.bundles import DEFAULT_BASE_PATH, storage_steps

pool_app = typer.Typer(help="Work pools of type `modal`.", no_args_is_help=True)
storage_app = typer.Typer(help="A pool's bundle and result storage.", no_args_is_help=True)
pool_app.add_typer(storage_app, name="storage")

#: Folder of the volume for the pool's default result storage.
RESULTS_BASE_PATH = "results"


def result_block_name(pool: str) -> str:
    """Prefect's own naming for a pool's default result storage block."""
    return f"default-{pool.lower()}-result-storage"


async def configure_pool_storage(
    pool: str,
    volume: str,
    base_path: str = DEFAULT_BASE_PATH,
    credentials_block: str | None = None,
    launcher: list[str] | None = None,
) -> dict[str, Any]:
    """Point `pool`'s bundle and result storage at `volume`; returns what was set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.objects import WorkPoolStorageConfiguration
    from prefect.exceptions import ObjectNotFound

    from prefect_modal.core.credentials import ModalCredentials
    from prefect_modal.storage import ModalVolume

    async with get_client() as client:
        try:
            work_pool = await client.read_work_pool(pool)
        except ObjectNotFound:
            raise ValueError(
                f"Work pool {pool!r} does not exist. Create it with:\n"
                f"    prefect work-pool create {pool} --type modal"
            ) from None
        if work_pool.type != "modal":
            raise ValueError(
                f"Work pool {pool!r} is of type {work_pool.type!r}, not 'modal'; a Modal Volume "
                "is storage for modal pools (prefect work-pool create NAME --type modal)."
            )
    credentials = await ModalCredentials.aload(credentials_block) if credentials_block else None
    block = ModalVolume(
        volume_name=volume, base_path=RESULTS_BASE_PATH, modal_credentials=credentials
    )
    ModalVolume(volume_name=volume, base_path=base_path)  # the same rules for the bundle path
    block_id = await block.asave(result_block_name(pool), overwrite=True)
    upload, execute = storage_steps(volume, base_path, credentials_block, launcher, launcher)
    async with get_client() as client:
        await client.update_work_pool(
            work_pool_name=pool,
            work_pool=WorkPoolUpdate(
                storage_configuration=WorkPoolStorageConfiguration(
                    bundle_upload_step=upload,
                    bundle_execution_step=execute,
                    default_result_storage_block_id=block_id,
                )
            ),
        )
    return {"upload": upload, "execution": execute, "result_storage": result_block_name(pool)}


@storage_app.command("configure")
def configure(
    pool: Annotated[str, typer.Argument(help="The modal work pool to configure.")],
    volume: Annotated[str, typer.Option(help="Modal Volume for bundles and results.")],
    base_path: Annotated[
        str, typer.Option(help="Folder of the volume for bundles.")
    ] = DEFAULT_BASE_PATH,
    modal_credentials_block_name: Annotated[
        str | None,
        typer.Option(help="ModalCredentials block the uploads use; default: Modal's own config."),
    ] = None,
    launcher: Annotated[
        list[str] | None,
        typer.Option(help="Command that runs the steps, one word per option (default: python)."),
    ] = None,
) -> None:
    """Keep the pool's flow-run bundles and results on a Modal Volume (no bucket needed)."""
    from pydantic import ValidationError

    try:
        done = asyncio.run(
            configure_pool_storage(pool, volume, base_path, modal_credentials_block_name, launcher)
        )
    except (ValueError, ValidationError) as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    table = Table(title=f"Storage of work pool {pool!r}")
    table.add_column("setting")
    table.add_column("value")
    table.add_row("type", "Modal Volume")
    table.add_row("volume", volume)
    table.add_row("bundles", f"{base_path}/")
    table.add_row("default result storage", f"modal-volume/{done['result_storage']}")
    Console(highlight=False).print(table)
    Console(highlight=False).print(f"Configured Modal Volume storage for work pool {pool!r}")
