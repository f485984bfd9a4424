"""The local server's blob store and the HTTP endpoint the client uploads to and reads from.

Modal's client moves file contents outside gRPC: ``BlobCreate`` answers with
an upload URL (S3 on Modal) the client ``PUT``s to, volume blocks go to the
``put_url`` of each missing block, and ``Volume.read_file`` ``GET``s block
URLs. Here those URLs point at a small aiohttp server on the local server's
own host (loopback), started on first use and stopped with the server.

Every URL carries an unguessable one-use-purpose token (``/put/<token>``,
``/get/<token>``) that names what it may write or read: a client cannot choose
a path. Contents are stored by their SHA-256 under ``<state>/blobs`` (the same
bytes are stored once, whether they came as a volume block, a mount file or a
blob), and a PUT whose bytes do not hash to what was announced is refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import ids
from .runtime import safe_files
from .runtime.isolation import FsRoot

log = logging.getLogger("prefect_modal.local")

TOKEN_TTL_S = 3600.0
_MAX_TOKENS = 100_000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Put:
    sha256_hex: str | None  # the announced content hash (None: not announced)
    blob_id: str | None  # a blob made by BlobCreate (else a content-addressed block)
    expires: float


@dataclass(frozen=True)
class _Get:
    root: Path  # opened at each GET; ``rel`` is resolved inside it (`open_in_root`)
    rel: str
    offset: int
    length: int
    expires: float


class BlobStore:
    """Content-addressed files under ``<state>/blobs`` and the HTTP endpoint for them."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1") -> None:
        self.root = state_dir / "blobs"
        self.host = "::1" if host == "::1" else "127.0.0.1"
        self._tokens: dict[str, _Put | _Get] = {}
        self._blobs: dict[str, str] = {}  # blob id -> sha256 hex of its content
        self._runner: web.AppRunner | None = None
        self._base = ""
        self._lock = asyncio.Lock()

    # ----- contents --------------------------------------------------------

    def path(self, sha256_hex: str) -> Path:
        if len(sha256_hex) != 64 or any(c not in "0123456789abcdef" for c in sha256_hex):
            raise ValueError(f"not a SHA-256 hex digest: {sha256_hex[:80]!r}")
        return self.root / sha256_hex[:2] / sha256_hex

    def has(self, sha256_hex: str) -> bool:
        try:
            return self.path(sha256_hex).is_file()
        except ValueError:
            return False

    def put_bytes(self, data: bytes, sha256_hex: str | None = None) -> str:
        """Store ``data``; returns its hash (ValueError if it is not the announced one)."""
        digest = hashlib.sha256(data).hexdigest()
        if sha256_hex is not None and digest != sha256_hex.lower():
            raise ValueError(f"content hashes to {digest}, not the announced {sha256_hex}")
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{digest}.{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return digest

    def new_blob(self, sha256_base64: str) -> str:
        """A blob id for BlobCreate (its content arrives by PUT)."""
        blob_id = ids.new_id("bl")
        sha = base64.b64decode(sha256_base64).hex() if sha256_base64 else ""
        self._blobs[blob_id] = sha
        return blob_id

    def blob_sha(self, blob_id: str) -> str | None:
        """The content hash of an uploaded blob, or None if it never arrived."""
        sha = self._blobs.get(blob_id)
        return sha if sha and self.has(sha) else None

    # ----- URLs --------------------------------------------------------------

    def _token(self, what: _Put | _Get) -> str:
        now = time.monotonic()
        if len(self._tokens) >= _MAX_TOKENS:
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires > now}
        token = secrets.token_urlsafe(24)
        self._tokens[token] = what
        return token

    async def put_url(self, *, sha256_hex: str | None = None, blob_id: str | None = None) -> str:
        await self._start()
        token = self._token(_Put(sha256_hex, blob_id, time.monotonic() + TOKEN_TTL_S))
        return f"{self._base}/put/{token}"

    async def get_url(self, root: Path, rel: str, offset: int = 0, length: int = -1) -> str:
        """A URL reading ``rel`` inside ``root`` (resolved at each read, inside the root:
        a symlink a sandbox put in a volume cannot make it read a host file)."""
        await self._start()
        token = self._token(_Get(root, rel, offset, length, time.monotonic() + TOKEN_TTL_S))
        return f"{self._base}/get/{token}"

    async def started_url(self) -> str:
        """``http://host:port`` of the endpoint, started if it was not (a sandbox
        whose modal client will use it needs its port forwarded: `runtime.network`)."""
        await self._start()
        return self._base

    # ----- the HTTP endpoint -------------------------------------------------

    async def _start(self) -> None:
        async with self._lock:
            if self._runner is not None:
                return
            app = web.Application(client_max_size=1 << 40)
            app.router.add_put("/put/{token}", self._handle_put)
            app.router.add_get("/get/{token}", self._handle_get)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            host = "[::1]" if self.host == "::1" else self.host
            self._base = f"http://{host}:{port}"
            self._runner = runner

    @property
    def url(self) -> str:
        """``http://host:port`` of the endpoint, or "" while it is not running."""
        return self._base if self._runner is not None else ""

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _lookup(self, request: web.Request) -> _Put | _Get:
        what = self._tokens.get(request.match_info["token"])
        if what is None or what.expires < time.monotonic():
            raise web.HTTPForbidden(text="unknown or expired URL")
        return what

    async def _handle_put(self, request: web.Request) -> web.StreamResponse:
        what = self._lookup(request)
        if not isinstance(what, _Put):
            raise web.HTTPForbidden(text="not an upload URL")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".upload-{secrets.token_hex(8)}"
        h = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.content.iter_chunked(_CHUNK):
                    h.update(chunk)
                    md5.update(chunk)
                    f.write(chunk)
            digest = h.hexdigest()
            announced = what.sha256_hex or (self._blobs.get(what.blob_id or "") or None)
            if announced and digest != announced:
                raise web.HTTPBadRequest(
                    text=f"content hashes to {digest}, not the announced {announced}"
                )
            want_md5 = request.headers.get("Content-MD5")
            if want_md5 and base64.b64encode(md5.digest()).decode() != want_md5:
                raise web.HTTPBadRequest(text="Content-MD5 does not match the body")
            target = self.path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if what.blob_id is not None:
            self._blobs[what.blob_id] = digest
        return web.Response(body=digest.encode(), headers={"ETag": f'"{md5.hexdigest()}"'})

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        """A block of a volume's file, streamed a chunk at a time (the server holds no
        more of it at once); only a regular file is read (`safe_files.open_regular`)."""
        what = self._lookup(request)
        if not isinstance(what, _Get):
            raise web.HTTPForbidden(text="not a download URL")
        try:
            fd = await asyncio.to_thread(_open_range, what.root, what.rel, what.offset)
        except OSError as exc:
            raise web.HTTPNotFound(text=f"cannot read: {exc.strerror}") from None
        try:
            response = web.StreamResponse()
            await response.prepare(request)
            left = what.length
            while left:
                want = _CHUNK if left < 0 else min(_CHUNK, left)
                chunk = await asyncio.to_thread(os.read, fd, want)
                if not chunk:
                    break
                await response.write(chunk)
                left = left - len(chunk) if left > 0 else left
            await response.write_eof()
        finally:
            os.close(fd)
        return response


def _open_range(root: Path, rel: str, offset: int) -> int:
    """``rel`` inside ``root`` (a regular file only), open at ``offset``."""
    fs_root = FsRoot(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), in_root=True)
    try:
        fd, _st = safe_files.open_regular(fs_root, rel)
    finally:
        fs_root.close()
    os.lseek(fd, offset, os.SEEK_SET)
    return fd
