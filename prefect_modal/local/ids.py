"""Object ids in the shapes the modal client expects.

The modal client checks id prefixes (``ap-``, ``im-``, ``st-``, ``sb-``, ``en-``,
``vo-``) when it hydrates objects, and it picks a sandbox back end from the
*shape* of a sandbox id: ``sb-`` followed by exactly 22 base62 characters is a
V1 sandbox, anything else is V2 (``modal/sandbox/_common.py``,
``_is_v1_sandbox_id``). ``modal shell`` and ``modal container`` accept a
sandbox id only if it is ``sb-`` followed by letters and digits
(``modal/cli/shell.py``, ``_is_valid_modal_id``), so a V2 id is ``sb-`` and
24 base62 characters: alphanumeric, and of a length no V1 id has. V2 task ids
end in ``V``. So the server mints ids of exactly the shape it means, and never
lets a V1 id look like a V2 one or the reverse.
"""

from __future__ import annotations

import secrets
import string

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: base62 characters after ``sb-`` in a V2 sandbox id (22 would make it a V1 id)
V2_SANDBOX_ID_LENGTH = 24


def _base62(n: int) -> str:
    # one urandom call instead of n secrets.choice calls (this is on the create path)
    value = int.from_bytes(secrets.token_bytes(n), "big")
    out = []
    for _ in range(n):
        value, digit = divmod(value, 62)
        out.append(_BASE62[digit])
    return "".join(out)


def new_id(prefix: str) -> str:
    """A Modal-style id: ``<prefix>-`` followed by 22 base62 characters."""
    return f"{prefix}-{_base62(22)}"


def new_sandbox_id(version: int) -> str:
    """A sandbox id that routes the client to back end ``version`` (1 or 2)."""
    if version == 1:
        return new_id("sb")
    return f"sb-{_base62(V2_SANDBOX_ID_LENGTH)}"


def new_task_id(version: int) -> str:
    """A task id; V2 sandbox tasks end in ``V`` (the client's V2 task marker)."""
    if version == 2:
        return f"ta-{_base62(21)}V"
    body = _base62(22)
    while body.endswith("V"):
        body = _base62(22)
    return f"ta-{body}"


def is_v1_sandbox_id(sandbox_id: str) -> bool:
    """Mirror of the client's rule, so the server agrees with it."""
    prefix, sep, suffix = sandbox_id.partition("-")
    return prefix == "sb" and sep == "-" and len(suffix) == 22 and all(c in _BASE62 for c in suffix)
