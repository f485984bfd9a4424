"""Snapshots against the local server: snapshot_filesystem / snapshot_directory give an
image whose files are the sandbox's as they stood; a sandbox made from it starts with them."""

from __future__ import annotations

from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal


def _run(sb: Any, *args: str) -> tuple[int, str, str]:
    p = sb.exec(*args)
    p.wait()
    return p.returncode, p.stdout.read(), p.stderr.read()


@pytest.mark.usefixtures("backend")
def test_snapshot_filesystem_then_a_new_sandbox_starts_with_its_files(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    sb = modal.Sandbox.create(app=app, client=client)
    try:
        code, _, err = _run(
            sb,
            "sh",
            "-c",
            "mkdir -p /opt/proj && echo before > /opt/proj/a.txt && "
            "echo home > /root/h.txt && ln -s a.txt /opt/proj/link && chmod 600 /opt/proj/a.txt",
        )
        assert code == 0, err
        image = sb.snapshot_filesystem()
        assert image.object_id.startswith("im-")
        # written after the snapshot: not in it
        assert _run(sb, "sh", "-c", "echo after > /opt/proj/a.txt; echo x > /opt/late.txt")[0] == 0
    finally:
        sb.terminate()

    loaded = modal.Image.from_id(image.object_id, client=client)
    sb2 = modal.Sandbox.create(app=app, image=loaded, client=client)
    try:
        code, out, err = _run(
            sb2,
            "sh",
            "-c",
            "cat /opt/proj/a.txt /opt/proj/link /root/h.txt; stat -c %a /opt/proj/a.txt; "
            "test -e /opt/late.txt && echo LATE || echo nolate",
        )
        assert code == 0, err
        assert out.split() == ["before", "before", "home", "600", "nolate"]
        # a write in the new sandbox changes neither the snapshot nor a third sandbox
        assert _run(sb2, "sh", "-c", "echo changed > /opt/proj/a.txt")[0] == 0
    finally:
        sb2.terminate()
    sb3 = modal.Sandbox.create(app=app, image=loaded, client=client)
    try:
        assert _run(sb3, "cat", "/opt/proj/a.txt")[1] == "before\n"
    finally:
        sb3.terminate()


def test_snapshot_keeps_out_volumes_and_image_from_id_names_a_missing_id(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    vol = modal.Volume.from_name("snapvol", create_if_missing=True, client=client)
    sb = modal.Sandbox.create(app=app, volumes={"/mnt/v": vol}, client=client)
    try:
        assert _run(sb, "sh", "-c", "echo v > /mnt/v/in-volume.txt")[0] == 0
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    sb2 = modal.Sandbox.create(app=app, image=image, client=client)
    try:
        code, out, _ = _run(sb2, "sh", "-c", "ls -A /mnt/v 2>/dev/null | wc -l")
        assert code == 0 and out.strip() == "0"
    finally:
        sb2.terminate()
    with pytest.raises(modal.exception.NotFoundError, match="im-doesnotexist"):
        modal.Sandbox.create(
            app=app, image=modal.Image.from_id("im-doesnotexist", client=client), client=client
        )


def test_snapshot_directory_names_a_missing_path(local_modal: LocalModal, app: Any) -> None:
    client = local_modal.client
    sb = modal.Sandbox.create(app=app, client=client)
    try:
        with pytest.raises(modal.exception.NotFoundError, match="/no/such/dir"):
            sb.snapshot_directory("/no/such/dir")
    finally:
        sb.terminate()


def test_snapshot_directory_then_mount_image_and_unmount_image(
    local_modal: LocalModal, app: Any
) -> None:
    if local_modal.isolation is None:
        pytest.skip(reason="mount_image needs isolated sandboxes")
    client = local_modal.client
    sb = modal.Sandbox.create(app=app, client=client)
    try:
        assert _run(sb, "sh", "-c", "mkdir -p /proj/src && echo code > /proj/src/m.py")[0] == 0
        snap = sb.snapshot_directory("/proj")
        assert snap.object_id.startswith("im-")
        assert _run(sb, "sh", "-c", "echo later > /proj/src/m.py")[0] == 0
    finally:
        sb.terminate()

    sb2 = modal.Sandbox.create(app=app, client=client)
    try:
        assert _run(sb2, "sh", "-c", "mkdir -p /work/p && echo under > /work/p/u.txt")[0] == 0
        sb2.mount_image("/work/p", snap)
        code, out, err = _run(sb2, "sh", "-c", "cat /work/p/src/m.py; ls /work/p")
        assert code == 0, err
        assert out.split() == ["code", "src"]
        # writable, and the write stays this sandbox's: the snapshot is unchanged
        assert _run(sb2, "sh", "-c", "echo mine > /work/p/src/m.py")[0] == 0
        sb2.unmount_image("/work/p")
        assert _run(sb2, "cat", "/work/p/u.txt")[1] == "under\n"
        with pytest.raises(modal.exception.Error, match="/work/p"):
            sb2.unmount_image("/work/p")
        sb2.mount_image("/again", snap)
        assert _run(sb2, "cat", "/again/src/m.py")[1] == "code\n"
    finally:
        sb2.terminate()


def test_a_snapshots_symlink_cannot_lead_a_mount_point_onto_the_host(
    local_modal: LocalModal, app: Any, tmp_path: Any
) -> None:
    if local_modal.isolation is None:
        pytest.skip(reason="mount points exist only in isolated sandboxes")
    client = local_modal.client
    outside = tmp_path / "outside"
    outside.mkdir()
    sb = modal.Sandbox.create(app=app, client=client)
    try:
        assert _run(sb, "ln", "-s", str(outside), "/mnt/v")[0] == 0
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    vol = modal.Volume.from_name("symvol", create_if_missing=True, client=client)
    sb2 = modal.Sandbox.create(app=app, image=image, volumes={"/mnt/v/data": vol}, client=client)
    try:
        code, _, err = _run(sb2, "sh", "-c", "echo in > /mnt/v/data/f.txt")
        assert code == 0, err
    finally:
        sb2.terminate()
    assert list(outside.iterdir()) == []  # nothing was made through the symlink
    assert b"".join(vol.read_file("/f.txt")) == b"in\n"
