"""``python -m prefect_modal.bundles.upload``: Prefect's bundle upload step for a Modal Volume.

Prefect runs it where a flow is submitted, in a folder that holds the bundle
file, as ``... --volume V --base-path P --key KEY FILE``; the file goes to
``P/KEY`` on the volume through the Volume API (see `prefect_modal.bundles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prefect_modal.bundles import DEFAULT_BASE_PATH


def upload_bundle_to_volume(
    local_filepath: str,
    volume: str,
    key: str,
    base_path: str = DEFAULT_BASE_PATH,
    modal_credentials_block_name: str | None = None,
) -> str:
    """Write one local file to the volume as ``base_path/key``; returns its volume path."""
    from prefect_modal.credentials import ModalCredentials
    from prefect_modal.storage import ModalVolume

    path = Path(local_filepath)
    if not path.is_file():
        raise FileNotFoundError(f"Bundle file {str(path)!r} does not exist.")
    credentials = (
        ModalCredentials.load(modal_credentials_block_name)
        if modal_credentials_block_name
        else None
    )
    block = ModalVolume(volume_name=volume, base_path=base_path, modal_credentials=credentials)
    return block.write_bytes(key, path.read_bytes())


def main(
    local_filepath: Annotated[str, typer.Argument(help="The bundle file to upload.")],
    volume: Annotated[str, typer.Option(help="Name of the Modal Volume.")],
    key: Annotated[str, typer.Option(help="Name of the bundle in the volume.")],
    base_path: Annotated[
        str, typer.Option(help="Folder of the volume for bundles.")
    ] = DEFAULT_BASE_PATH,
    modal_credentials_block_name: Annotated[
        str | None, typer.Option(help="A ModalCredentials block; default: Modal's own config.")
    ] = None,
) -> None:
    upload_bundle_to_volume(local_filepath, volume, key, base_path, modal_credentials_block_name)


if __name__ == "__main__":
    typer.run(main)
