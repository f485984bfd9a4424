"""Image.add_local_file / add_local_dir / add_local_python_source against the local
server, as mounts (the default) and as image layers (copy=True)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal


def _run(sb: Any, *args: str) -> tuple[int, str, str]:
    p = sb.exec(*args)
    p.wait()
    return p.returncode, p.stdout.read(), p.stderr.read()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "conf" / "nested").mkdir(parents=True)
    (root / "conf" / "a.toml").write_text("a = 1\n")
    (root / "conf" / "nested" / "b.txt").write_text("bee\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho ran\n")
    run.chmod(0o755)
    (root / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # over 4 MiB: a blob upload
    return root


@pytest.mark.parametrize("copy", [False, True], ids=["mount", "copy"])
def test_add_local_file_and_dir_appear_at_their_remote_paths(
    local_modal: LocalModal, app: Any, project: Path, copy: bool
) -> None:
    image = (
        modal.Image.debian_slim()
        .add_local_file(project / "run.sh", "/opt/tools/run.sh", copy=copy)
        .add_local_dir(project / "conf", "/etc-app/conf", copy=copy)
        .add_local_file(project / "big.bin", "/data/big.bin", copy=copy)
    )
    sb = modal.Sandbox.create(app=app, image=image, client=local_modal.client)
    try:
        code, out, err = _run(
            sb,
            "sh",
            "-c",
            "/opt/tools/run.sh && cat /etc-app/conf/a.toml /etc-app/conf/nested/b.txt && "
            "sha256sum /data/big.bin",
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[:3] == ["ran", "a = 1", "bee"]
        assert lines[3].split()[0] == hashlib.sha256((project / "big.bin").read_bytes()).hexdigest()
    finally:
        sb.terminate()


@pytest.mark.parametrize("copy", [False, True], ids=["mount", "copy"])
def test_add_local_python_source_is_importable(
    local_modal: LocalModal, app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    pkg = tmp_path / "src" / "localpkg_for_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 'from the laptop'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    image = modal.Image.debian_slim().add_local_python_source("localpkg_for_test", copy=copy)
    sb = modal.Sandbox.create(app=app, image=image, client=local_modal.client)
    try:
        code, out, err = _run(
            sb, "python", "-c", "import localpkg_for_test as m; print(m.VALUE, m.__file__)"
        )
        assert code == 0, err
        assert out.strip() == "from the laptop /root/localpkg_for_test/__init__.py"
    finally:
        sb.terminate()


def test_a_remote_path_inside_the_read_only_view_is_refused_by_name(
    local_modal: LocalModal, app: Any, project: Path
) -> None:
    if local_modal.isolation is None:
        pytest.skip(reason="needs isolated sandboxes (the read-only view exists only there)")
    for remote in ("/usr/local/bin/run.sh", "/bin/run.sh"):  # /bin is usr/bin on Debian
        image = modal.Image.debian_slim().add_local_file(project / "run.sh", remote)
        with pytest.raises(modal.exception.InvalidError, match=re.escape(remote)):
            modal.Sandbox.create(app=app, image=image, client=local_modal.client)


@pytest.mark.parametrize("copy", [False, True], ids=["mount", "copy"])
def test_mounted_files_are_read_only_and_copied_ones_writable(
    local_modal: LocalModal, app: Any, project: Path, copy: bool
) -> None:
    if local_modal.isolation is None:
        pytest.skip(reason="read-only binds need isolated sandboxes")
    image = (
        modal.Image.debian_slim()
        .add_local_dir(project / "conf", "/opt/conf", copy=copy)
        .add_local_file(project / "run.sh", "/root/run.sh", copy=copy)
    )
    sb = modal.Sandbox.create(app=app, image=image, client=local_modal.client)
    try:
        code, out, err = _run(
            sb,
            "sh",
            "-c",
            "echo x >> /opt/conf/a.toml; echo $?; echo y > /root/other.txt; echo $?; "
            "echo z >> /root/run.sh; echo $?; stat -c %a /root",
        )
        assert code == 0, err
        wrote_conf, wrote_root, wrote_run, root_mode = out.split()
        assert wrote_root == "0"  # /root itself stays the sandbox's, writable, mode 700
        assert root_mode == "700"
        assert (wrote_conf == "0", wrote_run == "0") == (copy, copy)
        if not copy:
            assert "Read-only file system" in err
    finally:
        sb.terminate()
    # the files on the server are unchanged either way
    sb2 = modal.Sandbox.create(app=app, image=image, client=local_modal.client)
    try:
        assert _run(sb2, "cat", "/opt/conf/a.toml")[1] == "a = 1\n"
    finally:
        sb2.terminate()


def test_a_mount_overlapping_a_volume_is_copied(
    local_modal: LocalModal, app: Any, project: Path
) -> None:
    vol = modal.Volume.from_name("overlap", create_if_missing=True, client=local_modal.client)
    image = modal.Image.debian_slim().add_local_dir(project / "conf", "/data/conf")
    sb = modal.Sandbox.create(
        app=app, image=image, volumes={"/data/vol": vol}, client=local_modal.client
    )
    try:
        code, out, err = _run(sb, "sh", "-c", "cat /data/conf/a.toml; echo v > /data/vol/f")
        assert code == 0, err
        assert out == "a = 1\n"
    finally:
        sb.terminate()
    assert b"".join(vol.read_file("/f")) == b"v\n"


def test_without_isolation_an_image_with_files_is_refused_with_the_reason(
    tmp_path: Path, project: Path
) -> None:
    with LocalModal(state_dir=tmp_path / "lm", isolation=False) as lm:
        app = modal.App.lookup("noiso", create_if_missing=True, client=lm.client)
        image = modal.Image.debian_slim().add_local_file(project / "run.sh", "/opt/run.sh")
        with pytest.raises(modal.exception.Error, match="cannot isolate"):
            modal.Sandbox.create(app=app, image=image, client=lm.client)
        assert lm.sandboxes() == []
