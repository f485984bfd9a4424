"""`ModalCredentials`: a Prefect block holding how to reach Modal.

A block, because that is where Prefect users keep credentials: saved once from
the UI or code, referenced by work pools and flows by name, the secret stored
encrypted by the Prefect server.  When no token is set the block falls back to
Modal's own ambient configuration (`MODAL_TOKEN_ID` / `MODAL_TOKEN_SECRET`,
`~/.modal.toml`), so a user who already ran `modal token new` configures
nothing twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

if TYPE_CHECKING:
    import modal


def ambient_credentials_present() -> bool:
    """True when Modal's own config would authenticate this process.

    Read the way the modal client reads it: env vars first, then the active
    profile of `~/.modal.toml` (or `MODAL_CONFIG_PATH`).  Only presence is
    checked; whether the token is valid is for Modal to say.
    """
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    try:
        text = path.read_text()
    except OSError:
        return False
    return "token_id" in text and "token_secret" in text


class ModalCredentials(Block):
    """Credentials and target for Modal: an API token pair and environment.

    Leave the token pair empty to use Modal's ambient configuration
    (`modal token new`, or the MODAL_TOKEN_ID / MODAL_TOKEN_SECRET variables).
    Set `server_url` only to reach a Modal-compatible server such as the one
    `prefect-modal local serve` runs.
    """

    # pydantic otherwise echoes the whole input, token secret included, in
    # validation errors; our own messages name fields without values.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Modal Credentials"
    _block_type_slug = "modal-credentials"
    _logo_url = "https://modal.com/assets/favicon.svg"  # type: ignore[assignment]
    _documentation_url = "https://github.com/prefect-modal/prefect-modal#credentials"  # type: ignore[assignment]
    _code_example = """
    ```python
    from prefect_modal import ModalCredentials

    modal_credentials = ModalCredentials.load("BLOCK_NAME")
    client = modal_credentials.get_client()
    ```
    """

    token_id: str | None = Field(
        default=None,
        description="Modal API token id (starts with 'ak-'); empty to use Modal's own config.",
    )
    token_secret: SecretStr | None = Field(
        default=None,
        description="Modal API token secret (starts with 'as-'); set together with token_id.",
    )
    modal_environment: str | None = Field(
        default=None,
        description="Modal environment to run in; empty for the workspace's default.",
    )
    server_url: str | None = Field(
        default=None,
        description=(
            "Modal API URL; empty for Modal's cloud. Set it to reach a Modal-compatible "
            "local server, e.g. http://127.0.0.1:7711."
        ),
    )

    @field_validator("token_id", "modal_environment", "server_url", mode="before")
    @classmethod
    def _blank_to_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("token_secret", mode="before")
    @classmethod
    def _blank_secret(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(raw, str) and not raw.strip() else value

    @field_validator("server_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"server_url={value!r} must start with http:// or https://, "
                "e.g. http://127.0.0.1:7711 for `prefect-modal local serve`."
            )
        return value

    @model_validator(mode="after")
    def _pair(self) -> ModalCredentials:
        # A half-configured pair would silently fall back to ambient config and
        # run as somebody else: refuse it instead.
        if (self.token_id is None) != (self.token_secret is None):
            missing = "token_secret" if self.token_secret is None else "token_id"
            raise ValueError(
                f"ModalCredentials: {missing} is missing; set token_id and token_secret together, "
                "or neither to use Modal's own config (`modal token new`)."
            )
        return self

    @property
    def has_token(self) -> bool:
        return self.token_id is not None and self.token_secret is not None

    def is_configured(self) -> bool:
        """True when this block or Modal's ambient config supplies a token."""
        return self.has_token or ambient_credentials_present()

    def get_client(self) -> modal.Client:
        """A `modal.Client` for these credentials (not the process-wide singleton).

        Built explicitly so that two blocks in one process never share Modal's
        `Client.from_env()` singleton and talk to the wrong workspace.
        """
        from prefect_modal.core.modal_api import connect

        secret = self.token_secret.get_secret_value() if self.token_secret else None
        return connect(server_url=self.server_url, token_id=self.token_id, token_secret=secret)
