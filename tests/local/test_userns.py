"""Which ids a sandbox's user namespace maps, what the server gives it, what it says when
user namespaces cannot be had (`prefect_modal.local.runtime.userns`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.runtime import forkserver, isolation, userns


def _maps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, line: str | None) -> None:
    for name in ("subuid", "subgid"):
        path = tmp_path / name
        path.write_text(f"{line}\n" if line else "")
        monkeypatch.setattr(userns, name.upper(), str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="the map of a server that runs as root")
def test_root_gets_its_subordinate_range_or_the_fixed_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _maps(monkeypatch, tmp_path, "root:300000:65536")
    ids = userns.for_this_process.__wrapped__()
    assert ids.uids == ((0, 300000, 65536),) and ids.gids == ((0, 300000, 65536),)
    assert ids.full and ids.helpers is None
    _maps(monkeypatch, tmp_path, "root:300000:1000")  # too small for a Debian userland
    ids = userns.for_this_process.__wrapped__()
    assert ids.root == (userns.FALLBACK_BASE, userns.FALLBACK_BASE) and ids.full


def test_a_normal_user_is_root_inside_with_or_without_a_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    monkeypatch.setattr(os, "getegid", lambda: 4322)
    monkeypatch.setattr(userns, "_names", lambda: ("alice", "4321"))
    monkeypatch.setattr(userns.shutil, "which", lambda name: f"/usr/bin/{name}")
    _maps(monkeypatch, tmp_path, "alice:100000:65536")
    ids = userns.for_this_process.__wrapped__()
    assert ids.uids == ((0, 4321, 1), (1, 100000, 65535))
    assert ids.gids == ((0, 4322, 1), (1, 100000, 65535))
    assert ids.full and ids.helpers == ("/usr/bin/newuidmap", "/usr/bin/newgidmap")
    _maps(monkeypatch, tmp_path, None)
    ids = userns.for_this_process.__wrapped__()
    assert ids.uids == ((0, 4321, 1),) and not ids.full and ids.single
    assert ids.spec()["setgroups"] is False
    assert "usermod --add-subuids" in userns.missing_range_help()
    assert "apt-get install uidmap" in userns.missing_range_help()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to other ids needs root")
def test_own_tree_gives_the_servers_files_to_root_inside(tmp_path: Path) -> None:
    ids = userns.IdMap(uids=((0, 200000, 65536),), gids=((0, 200000, 65536),))
    (tmp_path / "d").mkdir()
    made = tmp_path / "d" / "by-the-server"
    made.write_text("x")
    theirs = tmp_path / "d" / "by-the-sandbox"
    theirs.write_text("y")
    os.chown(theirs, 200033, 200034)  # www-data inside: left as it is
    other = tmp_path / "d" / "a-host-users"
    other.write_text("z")
    os.chown(other, 1000, 1000)
    link = tmp_path / "d" / "link"
    link.symlink_to("/etc/passwd")
    passwd = os.stat("/etc/passwd")
    userns.own_tree(tmp_path / "d", ids)
    owners = {p.name: (os.lstat(p).st_uid, os.lstat(p).st_gid) for p in (tmp_path / "d").iterdir()}
    assert owners == {
        "by-the-server": (200000, 200000),
        "by-the-sandbox": (200033, 200034),
        "a-host-users": (201000, 201000),
        "link": (200000, 200000),
    }
    assert os.stat(tmp_path / "d").st_uid == 200000
    after = os.stat("/etc/passwd")  # a link is changed, never followed
    assert (after.st_uid, after.st_gid) == (passwd.st_uid, passwd.st_gid)


def test_what_keeps_user_namespaces_away_is_named_with_its_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {"user/max_user_namespaces": 0}
    monkeypatch.setattr(isolation, "_sysctl", values.get)
    assert "max_user_namespaces" in (isolation.why_no_userns() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    values.clear()
    values["kernel/apparmor_restrict_unprivileged_userns"] = 1
    assert "apparmor_restrict_unprivileged_userns=0" in (isolation.why_no_userns() or "")
    assert "apparmor" in (isolation.why_not_isolated(True) or "").lower()
    values.clear()
    values["kernel/unprivileged_userns_clone"] = 0
    assert "unprivileged_userns_clone=1" in (isolation.why_no_userns() or "")
    values.clear()
    assert isolation.why_no_userns() is None and isolation.why_not_isolated(True) is None


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/proc/self/ns/pid"),
    reason="a server that isolates as root but cannot make user namespaces",
)
def test_without_user_namespaces_root_still_isolates_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Never refuse to start: the best isolation there is, and the missing part said once
    at start and in each sandbox's log."""
    monkeypatch.setattr(forkserver.ForkServer, "launcher_userns", property(lambda self: False))
    with caplog.at_level(logging.WARNING, logger="prefect_modal.local"):
        lm = LocalModal(state_dir=tmp_path).start()
    try:
        assert lm.isolation is not None and lm.isolation.idmap is None
        assert any("cannot make user namespaces" in r.getMessage() for r in caplog.records)
        app = modal.App.lookup("no-userns", create_if_missing=True, client=lm.client)
        sb = modal.Sandbox.create("sh", "-c", "cat /proc/self/uid_map", app=app, client=lm.client)
        sb.wait()
        assert sb.stdout.read().split() == ["0", "0", "4294967295"]  # the host's own map
        assert "this sandbox has no user namespace" in sb.stderr.read()
    finally:
        lm.stop()
