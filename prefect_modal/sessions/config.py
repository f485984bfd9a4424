"""`ModalSandboxConfig`: a saved sandbox configuration that opens sessions.

A block, because that is how Prefect users keep an integration's settings: a
deployment loads ``ModalSandboxConfig.load("eval-sandbox")`` and gets the
image, resources, secrets and credentials someone saved in the UI or in code,
so changing the sandbox needs no code change and no redeploy.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

from prefect_modal.core.credentials import ModalCredentials
from prefect_modal.core.spec import SandboxSpec
from prefect_modal.sessions.results import SandboxSnapshot
from prefect_modal.sessions.session import SandboxSession


class ModalSandboxConfig(Block):
    """A Modal Sandbox configuration (spec + credentials) that opens `SandboxSession`s.

    Leave `credentials` empty to use Modal's own config, or the local Modal
    server when there is none (as the task runner does).
    """

    _block_type_name = "Modal Sandbox Config"
    _block_type_slug = "modal-sandbox-config"
    _logo_url = "https://modal.com/assets/favicon.svg"  # type: ignore[assignment]
    _documentation_url = "https://github.com/prefect-modal/prefect-modal#sandbox-sessions"  # type: ignore[assignment]
    _code_example = """
    ```python
    from prefect_modal import ModalSandboxConfig

    with ModalSandboxConfig.load("BLOCK_NAME").open_session() as session:
        print(session.exec("python", "-c", "print(6 * 7)").stdout)
    ```
    """

    spec: SandboxSpec = Field(
        default_factory=SandboxSpec,
        description="Image, resources, secrets, env, volumes and lifetime of the sandboxes.",
    )
    credentials: ModalCredentials | None = Field(
        default=None, description="How to reach Modal; empty for Modal's own config."
    )
    block_network: bool = Field(
        default=False, description="Give the sandboxes no network access at all."
    )

    def open_session(self, *, keep: bool = False, **overrides: Any) -> SandboxSession:
        """A session on a new sandbox of this configuration; `overrides` are spec
        fields laid over the saved spec (e.g. ``timeout=600``)."""
        spec = self.spec.merged_with(SandboxSpec(**overrides)) if overrides else self.spec
        return SandboxSession.create(
            spec, credentials=self.credentials, keep=keep, block_network=self.block_network
        )

    def restore_session(self, snapshot: SandboxSnapshot, *, keep: bool = False) -> SandboxSession:
        """A session from `snapshot`, with this configuration's spec laid over the snapshot's."""
        return SandboxSession.restore(snapshot, self.spec, credentials=self.credentials, keep=keep)
