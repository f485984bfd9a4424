"""``python -m prefect_modal.bundles.execute``: Prefect's bundle execution step for a Modal Volume.

The sandbox's command for a flow run whose pool keeps bundles on a volume:
``... --volume V --base-path P --key KEY``.  The worker mounts the volume (and
says where in ``PREFECT_MODAL_VOLUME_MOUNTS``), so the bundle is read from the
mounted folder with no Modal token; elsewhere the Volume API is used.  The
bundle and its included files' zip are copied to a temporary folder and run by
Prefect's own ``prefect.bundles.execute``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from prefect_modal.bundles import DEFAULT_BASE_PATH
from prefect_modal.bundles.step_args import (
    BasePathOption,
    CredentialsBlockOption,
    KeyOption,
    VolumeOption,
    volume_block,
)


def download_bundle_from_volume(
    volume: str,
    key: str,
    output_dir: str,
    base_path: str = DEFAULT_BASE_PATH,
    modal_credentials_block_name: str | None = None,
) -> Path:
    """Copy the bundle (and its sidecar zip, if it names one) to `output_dir`; its path."""
    block = volume_block(volume, base_path, modal_credentials_block_name)
    data = block.read_bytes(key)
    target = Path(output_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    files_key = json.loads(data).get("files_key")
    if files_key:
        sidecar = Path(output_dir, files_key)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_bytes(block.read_bytes(files_key))
    return target


def main(
    volume: VolumeOption,
    key: KeyOption,
    base_path: BasePathOption = DEFAULT_BASE_PATH,
    modal_credentials_block_name: CredentialsBlockOption = None,
) -> None:
    from prefect.bundles.execute import execute_bundle_from_file

    with tempfile.TemporaryDirectory(prefix="prefect-modal-bundle-") as folder:
        path = download_bundle_from_volume(
            volume, key, folder, base_path, modal_credentials_block_name
        )
        execute_bundle_from_file(str(path))


if __name__ == "__main__":
    typer.run(main)
