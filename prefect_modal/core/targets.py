"""Which Modal a process talks to: Modal's cloud, or the local server.

Resolved once per process and cached, because a Modal client holds
connections and the local server holds running sandboxes: the task runner,
its duplicates and the worker must all share one of each.  The rule a user can
predict: credentials (a block, `MODAL_TOKEN_*`, `~/.modal.toml`) mean Modal;
none mean the local server, started here with a one-line notice;
`PREFECT_MODAL_TARGET=local|modal` overrides the guess.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from prefect_modal.core.credentials import ModalCredentials, ambient_credentials_present
from prefect_modal.core.errors import PrefectModalError

if TYPE_CHECKING:
    import modal

    from prefect_modal.local import LocalModal

TARGET_ENV_VAR = "PREFECT_MODAL_TARGET"
TargetKind = Literal["local", "modal"]
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

logger = logging.getLogger("prefect_modal")


@dataclass(frozen=True)
class Target:
    """A connected Modal: the client, where it points, and how a child reaches it."""

    kind: TargetKind
    client: modal.Client = field(repr=False, compare=False)
    server_url: str
    #: Variables a child process (a worker, a flow run) needs to reach the same
    #: Modal.  Holds the token secret: pass it to processes, never log it.
    env: dict[str, str] = field(repr=False, compare=False, default_factory=dict)


class TargetError(PrefectModalError, RuntimeError):
    """Modal cannot be reached with what is configured; the message says what to do."""


_lock = threading.Lock()
_targets: dict[tuple[str, str | None, str | None], Target] = {}
_local_server: LocalModal | None = None


def requested_target() -> Literal["auto", "local", "modal"]:
    value = os.environ.get(TARGET_ENV_VAR, "").strip().lower() or "auto"
    if value not in ("auto", "local", "modal"):
        raise TargetError(
            f"{TARGET_ENV_VAR}={value!r} is not understood; use 'local' (the local Modal "
            "server), 'modal' (Modal's cloud, needs credentials) or leave it unset to choose "
            "by whether credentials are found."
        )
    return value  # type: ignore[return-value]


def is_loopback(url: str) -> bool:
    return (urlparse(url).hostname or "") in _LOOPBACK_HOSTS


def resolve_target(credentials: ModalCredentials | None = None) -> Target:
    """Connect to Modal as configured, or to the local server when nothing is."""
    choice = requested_target()
    has_credentials = bool(credentials and credentials.has_token) or ambient_credentials_present()
    if choice == "local" or (choice == "auto" and not has_credentials):
        return _local_target()
    if not has_credentials:
        raise TargetError(
            f"{TARGET_ENV_VAR}=modal but no Modal credentials were found. Run `modal token new`, "
            "set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or pass a ModalCredentials block."
        )
    creds = credentials or ModalCredentials()
    # Ambient values are part of the key: a process whose MODAL_* variables
    # change (a test pointed at another server) must not keep the old client.
    key = (
        "modal",
        creds.server_url or os.environ.get("MODAL_SERVER_URL"),
        creds.token_id or os.environ.get("MODAL_TOKEN_ID"),
    )
    with _lock:
        if key not in _targets:
            _targets[key] = _connect(creds)
        return _targets[key]


def _connect(creds: ModalCredentials) -> Target:
    from prefect_modal.core import modal_api

    try:
        client = creds.get_client()
        modal_api.verify(client)
    except modal_api.AuthError as exc:
        raise TargetError(
            f"Modal refused the credentials ({exc}). Run `modal token new` to make a new token, "
            "or update the ModalCredentials block's token_id / token_secret."
        ) from None
    url = modal_api.server_url(client)
    env = {"MODAL_SERVER_URL": url}
    if creds.token_id and creds.token_secret:
        env |= {
            "MODAL_TOKEN_ID": creds.token_id,
            "MODAL_TOKEN_SECRET": creds.token_secret.get_secret_value(),
        }
    else:
        env |= {
            k: v for k, v in os.environ.items() if k in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")
        }
    if creds.modal_environment:
        env["MODAL_ENVIRONMENT"] = creds.modal_environment
    return Target(
        kind="local" if is_loopback(url) else "modal", client=client, server_url=url, env=env
    )


def _local_target() -> Target:
    """The local server: one started by `prefect-modal local serve` if the env
    points at it, else one started in this process (stopped at exit)."""
    global _local_server
    ambient_url = os.environ.get("MODAL_SERVER_URL", "")
    if ambient_url and is_loopback(ambient_url) and ambient_credentials_present():
        return resolve_ambient_local()
    with _lock:
        target = _targets.get(("local", None, None))
        if target is not None:
            return target
        from prefect_modal.local import LocalModal

        server = LocalModal()
        server.start()
        _local_server = server
        atexit.register(server.stop)
        logger.warning(
            "prefect-modal: no Modal credentials found, so sandboxes run on a local Modal server "
            "at %s (processes on this machine). To run on Modal: `modal token new`, or set "
            "%s=modal.",
            server.url,
            TARGET_ENV_VAR,
        )
        target = Target(
            kind="local", client=server.client, server_url=server.url, env=dict(server.env)
        )
        _targets[("local", None, None)] = target
        return target


def resolve_ambient_local() -> Target:
    """A local server this process was pointed at through MODAL_SERVER_URL."""
    key = ("ambient-local", os.environ.get("MODAL_SERVER_URL"), os.environ.get("MODAL_TOKEN_ID"))
    with _lock:
        if key not in _targets:
            _targets[key] = _connect(ModalCredentials())
        return _targets[key]


def local_server() -> LocalModal | None:
    """The in-process local server, if this process started one."""
    return _local_server
