"""The client's Volume API against the local server: batch_upload, listdir, read_file,
remove_file, copy_files, commit/reload, and the files at a sandbox's mount path."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal


def _vol(local_modal: LocalModal, name: str = "data") -> Any:
    return modal.Volume.from_name(name, create_if_missing=True, client=local_modal.client)


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
    vol = _vol(local_modal)
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
    vol = _vol(local_modal)
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
