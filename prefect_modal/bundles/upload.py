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
from prefect_modal.bundles.step_args import (
    BasePathOption,
    CredentialsBlockOption,
    KeyOption,
    VolumeOption,
    volume_block,
)


def upload_bundle_to_volume(
    local_filepath: str,
    volume: str,
    key: str,
    base_path: str = DEFAULT_BASE_PATH,
    modal_credentials_block_name: str | None = None,
) -> str:
    """Write one local file to the volume as ``base_path/key``; returns its volume path."""
    path = Path(local_filepath)
    if not path.is_file():
        raise FileNotFoundError(f"Bundle file {str(path)!r} does not exist.")
    block = volume_block(volume, base_path, modal_credentials_block_name)
    return block.write_bytes(key, path.read_bytes())


def main(
    local_filepath: Annotated[str, typer.Argument(help="The bundle file to upload.")],
    volume: VolumeOption,
    key: KeyOption,
    base_path: BasePathOption = DEFAULT_BASE_PATH,
    modal_credentials_block_name: CredentialsBlockOption = None,
) -> None:
    upload_bundle_to_volume(local_filepath, volume, key, base_path, modal_credentials_block_name)


if __name__ == "__main__":
    typer.run(main)
