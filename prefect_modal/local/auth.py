"""Who may talk to the local server.

The control plane checks the token pair the modal client sends as metadata
(``x-modal-token-id`` / ``x-modal-token-secret``) on every call. The command
router (V2 stdio, exec) is reached over a separate channel that carries only
``authorization: Bearer <jwt>``; the server mints those JWTs itself, HMAC-signed
with a per-server key, scoped to one task and with an ``exp`` claim (the client
parses ``exp`` to know when to refresh).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Credentials:
    """The token pair clients must present, and the key that signs router JWTs."""

    token_id: str = field(default_factory=lambda: "ak-local-" + secrets.token_hex(8))
    token_secret: str = field(
        default_factory=lambda: "as-local-" + secrets.token_hex(16), repr=False
    )
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def check_tokens(self, token_id: str | None, token_secret: str | None) -> bool:
        if not token_id or not token_secret:
            return False
        ok_id = hmac.compare_digest(token_id.encode(), self.token_id.encode())
        ok_secret = hmac.compare_digest(token_secret.encode(), self.token_secret.encode())
        return ok_id and ok_secret

    def mint_jwt(self, subject: str, ttl_s: int = 3600) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": subject, "exp": int(time.time()) + ttl_s}).encode())
        sig = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(sig)}"

    def verify_jwt(self, token: str) -> str | None:
        """The subject of a valid, unexpired token we minted; else None."""
        try:
            header, payload, sig = token.split(".")
            want = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, _unb64(sig)):
                return None
            claims = json.loads(_unb64(payload))
            if float(claims["exp"]) < time.time():
                return None
            return str(claims["sub"])
        except (ValueError, KeyError, TypeError):
            return None
