"""The client's Volume API against the local server: batch_upload, listdir, read_file,
remove_file, copy_files, commit/reload, and the files at a sandbox's mount path."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import aiohttp
import modal
import pytest
from grpclib import GRPCError, Status
from grpclib.client import Channel
from modal_proto import api_pb2
from modal_proto.api_grpc import ModalClientStub

from prefect_modal.local import LocalModal


def _vol(local_modal: LocalModal, name: str = "data", version: int | None = None) -> Any:
    """A volume: unversioned (v1, as on Modal) unless ``version`` says otherwise."""
    return modal.Volume.from_name(
        name, create_if_missing=True, version=version, client=local_modal.client
    )


def _read(vol: Any, path: str) -> bytes:
    return b"".join(vol.read_file(path))


def test_batch_upload_listdir_read_file_and_a_sandbox_sees_them(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(3000))
    big = os.urandom(9 * 1024 * 1024 + 17)  # two blocks of 8 MiB
    (tmp_path / "big.bin").write_bytes(big)
    vol = _vol(local_modal)
    with vol.batch_upload() as batch:
        batch.put_directory(src, "/dir")
        batch.put_file(tmp_path / "big.bin", "/big.bin")
        batch.put_file(io.BytesIO(b"from memory"), "mem/m.txt")
        batch.put_file(io.BytesIO(b""), "/empty")

    top = {e.path: e for e in vol.listdir("/")}
    assert set(top) == {"dir", "big.bin", "mem", "empty"}
    assert top["dir"].type == modal.volume.FileEntryType.DIRECTORY
    assert top["big.bin"].size == len(big)
    deep = sorted(e.path for e in vol.listdir("/dir", recursive=True))
    assert deep == ["dir/a.txt", "dir/sub", "dir/sub/b.bin"]
    assert [e.path for e in vol.listdir("dir/a.txt")] == ["dir/a.txt"]

    assert _read(vol, "/dir/a.txt") == b"alpha"
    assert _read(vol, "dir/sub/b.bin") == (src / "sub" / "b.bin").read_bytes()
    assert _read(vol, "/big.bin") == big
    assert _read(vol, "/empty") == b""
    assert _read(vol, "/mem/m.txt") == b"from memory"

    sb = modal.Sandbox.create(
        "cat",
        "/mnt/data/dir/a.txt",
        "/mnt/data/mem/m.txt",
        app=app,
        volumes={"/mnt/data": vol},
        client=local_modal.client,
    )
    sb.wait()
    assert sb.stdout.read() == "alphafrom memory"
    assert sb.returncode == 0


BLOCK = 8 * 1024 * 1024


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(os.urandom(BLOCK + 16) + b"\0", id="last-byte-zero"),
        pytest.param(
            os.urandom(BLOCK - 5) + b"\0" * 5 + os.urandom(9), id="first-block-ends-in-zeros"
        ),
        pytest.param(os.urandom(100) + b"\0" * (2 * BLOCK) + b"x", id="an-all-zero-block"),
        pytest.param(b"\0" * (BLOCK + 3), id="only-zeros"),
        pytest.param(b"abc\0\0\0", id="small-with-trailing-zeros"),
    ],
)
def test_trailing_zero_bytes_that_the_client_leaves_out_of_a_block_are_kept(
    local_modal: LocalModal, app: Any, tmp_path: Path, content: bytes
) -> None:
    # Modal's client hashes and uploads a block without its trailing zeros and sends the
    # file's size: the file must come back whole, by listing, by read_file and in a sandbox.
    (tmp_path / "f.bin").write_bytes(content)
    vol = _vol(local_modal)
    with vol.batch_upload() as batch:
        batch.put_file(tmp_path / "f.bin", "/f.bin")
        batch.put_file(io.BytesIO(content), "/mem.bin")
    sizes = {e.path: e.size for e in vol.listdir("/")}
    assert sizes == {"f.bin": len(content), "mem.bin": len(content)}
    assert _read(vol, "/f.bin") == content
    assert _read(vol, "/mem.bin") == content
    sb = modal.Sandbox.create(
        "sha256sum", "/mnt/v/f.bin", app=app, volumes={"/mnt/v": vol}, client=local_modal.client
    )
    sb.wait()
    assert sb.stdout.read().split()[0] == hashlib.sha256(content).hexdigest()


def test_blocks_that_cannot_make_the_announced_size_are_refused(local_modal: LocalModal) -> None:
    vol = _vol(local_modal).hydrate()
    creds = local_modal.credentials
    md = {"x-modal-token-id": creds.token_id, "x-modal-token-secret": creds.token_secret}
    sha = hashlib.sha256(b"abc").digest()

    async def put(size: int, n_blocks: int) -> tuple[Status, str]:
        channel = Channel("127.0.0.1", local_modal.port)
        stub = ModalClientStub(channel)
        block = api_pb2.VolumePutFiles2Request.Block(contents_sha256=sha)
        req = api_pb2.VolumePutFiles2Request(
            volume_id=vol.object_id,
            files=[
                api_pb2.VolumePutFiles2Request.File(path="/x", size=size, blocks=[block] * n_blocks)
            ],
        )
        try:
            for _ in range(2):  # the first answer names the missing block
                resp = await stub.VolumePutFiles2(req, metadata=md)
                for missing in resp.missing_blocks:
                    async with aiohttp.ClientSession() as http:
                        async with http.put(missing.put_url, data=b"abc") as r:
                            assert r.status == 200
            return Status.OK, ""
        except GRPCError as exc:
            return exc.status, exc.message or ""
        finally:
            channel.close()

    status, message = asyncio.run(put(size=3, n_blocks=2))
    assert status == Status.INVALID_ARGUMENT
    assert "'/x': 2 blocks for a size of 3 bytes (expected 1 blocks" in message
    status, message = asyncio.run(put(size=2, n_blocks=1))
    assert status == Status.INVALID_ARGUMENT
    assert "'/x': block 0 holds 3 bytes, more than the 2" in message
    assert asyncio.run(put(size=BLOCK + 5, n_blocks=2)) == (Status.OK, "")
    assert _read(vol, "/x") == b"abc" + b"\0" * (BLOCK - 3) + b"abc\0\0"
    assert [e.path for e in vol.listdir("/")] == ["x"]


def test_upload_without_force_refuses_an_existing_file(local_modal: LocalModal) -> None:
    vol = _vol(local_modal)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"one"), "/f.txt")
    with pytest.raises(FileExistsError, match=r"f\.txt"):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"two"), "/f.txt")
    assert _read(vol, "/f.txt") == b"one"
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"two"), "/f.txt")
    assert _read(vol, "/f.txt") == b"two"


def test_missing_paths_name_the_path(local_modal: LocalModal) -> None:
    vol = _vol(local_modal)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        _read(vol, "/nope.txt")
    with pytest.raises(modal.exception.NotFoundError, match="nodir"):
        vol.listdir("/nodir")
    with pytest.raises(FileNotFoundError, match=r"gone\.txt"):
        vol.remove_file("/gone.txt")


def test_remove_and_copy_files(local_modal: LocalModal) -> None:
    vol = _vol(local_modal, version=2)  # a recursive copy is v2 only (modal/volume.py)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"A"), "/a.txt")
        batch.put_file(io.BytesIO(b"B"), "/d/b.txt")
        batch.put_file(io.BytesIO(b"C"), "/d/e/c.txt")

    vol.copy_files(["/a.txt"], "/a-copy.txt")
    assert _read(vol, "/a-copy.txt") == b"A"
    vol.copy_files(["/a.txt", "/d/b.txt"], "/into/")
    assert sorted(e.path for e in vol.listdir("/into")) == ["into/a.txt", "into/b.txt"]
    with pytest.raises(modal.exception.InvalidError, match="recursive"):
        vol.copy_files(["/d"], "/d2")
    vol.copy_files(["/d"], "/d2", recursive=True)
    assert _read(vol, "/d2/e/c.txt") == b"C"

    with pytest.raises(modal.exception.InvalidError, match="recursive"):
        vol.remove_file("/d")
    vol.remove_file("/d", recursive=True)
    vol.remove_file("/a.txt")
    assert sorted(e.path for e in vol.listdir("/")) == ["a-copy.txt", "d2", "into"]


def test_commit_and_reload_succeed_and_writes_are_live(local_modal: LocalModal, app: Any) -> None:
    """Local volumes are one live directory: a sandbox's write is visible at once
    (on Modal only after its commit); commit and reload are accepted."""
    vol = _vol(local_modal, version=2)
    sb = modal.Sandbox.create(
        "sh", "-c", "echo hi > /v/w.txt", app=app, volumes={"/v": vol}, client=local_modal.client
    )
    sb.wait()
    assert _read(vol, "/w.txt") == b"hi\n"
    vol.commit()
    vol.reload()


def test_a_symlink_made_in_a_sandbox_cannot_point_the_server_outside(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    vol = _vol(local_modal)
    sb = modal.Sandbox.create(
        "ln", "-s", str(secret), "/v/link", app=app, volumes={"/v": vol}, client=local_modal.client
    )
    sb.wait()
    with pytest.raises(FileNotFoundError):
        _read(vol, "/link")


def test_a_v1_volume_uploads_lists_removes_and_copies(local_modal: LocalModal, app: Any) -> None:
    """VolumeFS v1 volumes: the client sends each file whole (MountPutFile, first asking
    whether the content is there), then VolumePutFiles / VolumeListFiles / ..."""
    vol = modal.Volume.from_name("v1", create_if_missing=True, version=1, client=local_modal.client)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"one"), "/a/one.txt")
        batch.put_file(io.BytesIO(b""), "/a/empty")
    with pytest.raises(FileExistsError, match=r"one\.txt"):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"two"), "/a/one.txt")
    assert sorted(e.path for e in vol.listdir("/", recursive=True)) == [
        "a",
        "a/empty",
        "a/one.txt",
    ]
    vol.copy_files(["/a/one.txt"], "/b.txt")
    vol.remove_file("/a/empty")
    assert _read(vol, "/b.txt") == b"one"
    assert sorted(e.path for e in vol.listdir("/", recursive=True)) == ["a", "a/one.txt", "b.txt"]
    sb = modal.Sandbox.create(
        "cat", "/v/a/one.txt", app=app, volumes={"/v": vol}, client=local_modal.client
    )
    sb.wait()
    assert sb.stdout.read() == "one"


def test_an_ephemeral_volume_lives_while_its_client_heartbeats(
    local_modal: LocalModal, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_modal.local.api import volumes as volumes_api

    with modal.Volume.ephemeral(client=local_modal.client) as vol:
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"scratch"), "/s.txt")
        sb = modal.Sandbox.create(
            "cat", "/scratch/s.txt", app=app, volumes={"/scratch": vol}, client=local_modal.client
        )
        sb.wait()
        assert sb.stdout.read() == "scratch"
        # a nameless volume is not listed among the named ones
        assert vol.object_id not in {
            v.object_id for v in modal.Volume.objects.list(client=local_modal.client)
        }
        volume_id = vol.object_id
    # its client stopped heartbeating: once the timeout passes, the server forgets it
    monkeypatch.setattr(volumes_api, "EPHEMERAL_TIMEOUT_S", 0.0)
    other = _vol(local_modal, "other")  # any volume call sweeps
    assert other.listdir("/") == []
    with pytest.raises(modal.exception.NotFoundError, match=volume_id):
        modal.Volume.from_id(volume_id, client=local_modal.client).listdir("/")


def test_delete_a_volume_by_name_and_list_them(local_modal: LocalModal, app: Any) -> None:
    vol = _vol(local_modal, "to-delete")
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"x"), "/x")
    names = {v.name for v in modal.Volume.objects.list(client=local_modal.client)}
    assert "to-delete" in names
    sb = modal.Sandbox.create(
        "sleep", "30", app=app, volumes={"/v": vol}, client=local_modal.client
    )
    try:
        with pytest.raises(Exception, match=r"mounted by running sandbox.*terminate them first"):
            modal.Volume.objects.delete("to-delete", client=local_modal.client)
    finally:
        sb.terminate()
        sb.wait(raise_on_termination=False)
    modal.Volume.objects.delete("to-delete", client=local_modal.client)
    assert "to-delete" not in {v.name for v in modal.Volume.objects.list(client=local_modal.client)}
    with pytest.raises(modal.exception.NotFoundError):
        modal.Volume.from_name("to-delete", client=local_modal.client).listdir("/")
