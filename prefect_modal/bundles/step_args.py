"""What both bundle steps take: their command-line options, and the volume they name.

Prefect calls each step with the same ``--volume``, ``--base-path`` and
``--key`` (and, for the upload, the credentials block), so the two modules
share one definition of each option and one way to open the volume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from prefect_modal.bundles import DEFAULT_BASE_PATH

if TYPE_CHECKING:
    from prefect_modal.storage import ModalVolume

VolumeOption = Annotated[str, typer.Option(help="Name of the Modal Volume.")]
KeyOption = Annotated[str, typer.Option(help="Name of the bundle in the volume.")]
BasePathOption = Annotated[str, typer.Option(help="Folder of the volume for bundles.")]
CredentialsBlockOption = Annotated[
    str | None, typer.Option(help="A ModalCredentials block; default: Modal's own config.")
]


def volume_block(
    volume: str, base_path: str = DEFAULT_BASE_PATH, credentials_block: str | None = None
) -> ModalVolume:
    """The `ModalVolume` block of the steps' arguments (Modal's own config without a
    credentials block)."""
    from prefect_modal.core.credentials import ModalCredentials
    from prefect_modal.storage import ModalVolume

    credentials = ModalCredentials.load(credentials_block) if credentials_block else None
    return ModalVolume(volume_name=volume, base_path=base_path, modal_credentials=credentials)
