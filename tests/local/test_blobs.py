"""The local server's blob endpoint: uploads are checked against the announced hash,
URLs are unguessable tokens, and the endpoint stops with its server."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import urllib.parse
from pathlib import Path

import aiohttp
import modal

from prefect_modal.local import LocalModal
from prefect_modal.local.blobs import BlobStore


def _port_open(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except OSError:
        return False


def test_uploads_are_checked_and_tokens_are_required(tmp_path: Path) -> None:
    data = b"block contents"
    sha = hashlib.sha256(data).hexdigest()

    async def scenario() -> tuple[int, int, int, int, bool, str]:
        store = BlobStore(tmp_path)
        try:
            url = await store.put_url(sha256_hex=sha)
            async with aiohttp.ClientSession() as http:
                async with http.put(url, data=b"something else") as r:
                    wrong = r.status
                async with http.put(url.rsplit("/", 1)[0] + "/not-a-token", data=data) as r:
                    unknown = r.status
                async with http.put(url, data=data) as r:
                    right = r.status
                get = await store.get_url(store.path(sha).parent, sha)
                async with http.put(get.replace("/get/", "/put/"), data=data) as r:
                    put_on_get = r.status
            return wrong, unknown, right, put_on_get, store.has(sha), store.url
        finally:
            await store.close()

    wrong, unknown, right, put_on_get, stored, url = asyncio.run(scenario())
    assert (wrong, unknown, right, put_on_get) == (400, 403, 200, 403)
    assert stored
    assert url.startswith("http://127.0.0.1:")
    assert not _port_open(url)


def test_the_blob_endpoint_stops_with_the_server(tmp_path: Path) -> None:
    with LocalModal(state_dir=tmp_path / "lm") as lm:
        # v2: its uploads go as blocks through the blob endpoint (a v1 volume sends
        # small files inline)
        vol = modal.Volume.from_name("v", create_if_missing=True, version=2, client=lm.client)
        with vol.batch_upload() as batch:
            batch.put_file(__file__, "/t.py")
        url = lm._ctx.blobs.url
        assert url and _port_open(url)
    assert not _port_open(url)
