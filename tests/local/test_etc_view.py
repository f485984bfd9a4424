"""A sandbox's /etc is an allow list of the host's (issue 22, item 7).

With a deny list (the host's /etc minus /etc/shadow...), root in a sandbox read
every root-only file the list missed (``/etc/security/opasswd``,
``/etc/default/cacerts`` here). Now sandboxes see only `etc_view.ETC_ALLOWED`,
and of it only what others may read, plus what the image's layers add.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import modal
import pytest

from prefect_modal.local import LocalModal
from prefect_modal.local.runtime import etc_view, isolation

#: In the sandbox: /etc's names, which of the given paths exist, and what Python
#: needs of /etc working (users, the CA store for HTTPS).
_PROBE = """
import json, os, pwd, ssl, sys
paths = json.loads(sys.argv[1])
ctx = ssl.create_default_context()
print(json.dumps({
    "names": sorted(os.listdir("/etc")),
    "present": [p for p in paths if os.path.lexists(p)],
    "root": pwd.getpwuid(0).pw_name,
    "cas": ctx.cert_store_stats()["x509_ca"],
    "hosts": open("/etc/hosts").read() == open("/etc/hosts").read(),
}))
"""


def _probe(lm: LocalModal, app: Any, paths: list[str]) -> dict[str, Any]:
    sb = modal.Sandbox.create(
        "python3", "-c", _PROBE, json.dumps(paths), app=app, client=lm.client
    )  # fmt: skip
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def _host_etc_outside_the_allow_list() -> tuple[list[str], list[str]]:
    """This machine's /etc entries the allow list leaves out (top-level names), and
    its root-only files (not readable by others) that no mask covers."""
    outside = [n for n in sorted(os.listdir("/etc")) if not etc_view.allowed(n)]
    root_only = []
    for here, dirs, files in os.walk("/etc"):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(here, d))]
        for name in [*dirs, *files]:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or st.st_mode & stat.S_IROTH:
                continue
            if not any(path == m or path.startswith(m + "/") for m in isolation.MASKED):
                root_only.append(path)
    return outside, root_only


@pytest.fixture
def isolated(local_modal: LocalModal) -> LocalModal:
    if local_modal.isolation is None:
        pytest.skip(reason=f"needs isolated sandboxes: {local_modal.not_isolated_because}")
    return local_modal


def test_a_sandbox_sees_only_the_allowed_part_of_the_hosts_etc(
    isolated: LocalModal, app: Any
) -> None:
    outside, root_only = _host_etc_outside_the_allow_list()
    if not outside and not root_only:
        pytest.skip(reason="this machine's /etc has nothing outside the allow list to hide")
    needed = ["/etc/passwd", "/etc/group", "/etc/hosts", "/etc/resolv.conf", "/etc/ssl/certs"]
    needed = [p for p in needed if os.path.exists(p)]
    seen = _probe(isolated, app, [*(f"/etc/{n}" for n in outside), *root_only, *needed])
    # nothing outside the allow list, no root-only file of the host's
    assert [n for n in seen["names"] if not etc_view.allowed(n)] == []
    assert set(seen["present"]) == set(needed), seen["present"]
    # what a Debian userland needs is there: users, name resolution, the CA store
    assert seen["root"] == "root" and seen["hosts"]
    assert seen["cas"] > 0


def test_the_allow_list_comes_from_its_source_without_root_only_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stage_etc` from a tree of the test's own (never the host's /etc is written)."""
    etc, run = tmp_path / "etc", tmp_path / "run"
    for d in ("apt/auth.conf.d", "ssl/certs", "ssl/private", "python3.11", "security"):
        (etc / d).mkdir(parents=True)
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "fstab": "not shown\n",
        "apt/sources.list": "deb http://deb.example bookworm main\n",
        "apt/auth.conf.d/creds.conf": "machine deb.example password secret\n",
        "ssl/certs/ca.pem": "a CA\n",
        "ssl/private/key.pem": "a key\n",
        "python3.11/sitecustomize.py": "\n",
        "security/opasswd": "root-only\n",
    }
    for rel, text in files.items():
        (etc / rel).write_text(text)
        (etc / rel).chmod(0o644)
    for rel in ("apt/auth.conf.d/creds.conf", "ssl/private/key.pem", "security/opasswd"):
        (etc / rel).chmod(0o600)
    (etc / "ssl/private").chmod(0o700)
    run.mkdir()
    (run / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    (run / "resolv.conf").chmod(0o644)
    (etc / "resolv.conf").symlink_to(run / "resolv.conf")  # out of the tree: copied
    (etc / "mtab").symlink_to("../proc/self/mounts")  # into the sandbox's tree: a link

    staged = tmp_path / "state" / "etc-view"
    etc_view.stage_etc(etc, staged)
    found = sorted(
        os.path.relpath(os.path.join(d, n), staged)
        for d, dirs, names in os.walk(staged)
        for n in [*dirs, *names]
    )
    assert found == [
        "apt",
        "apt/auth.conf.d",
        "apt/sources.list",
        "mtab",
        "passwd",
        "python3.11",
        "python3.11/sitecustomize.py",
        "resolv.conf",
        "ssl",
        "ssl/certs",
        "ssl/certs/ca.pem",
    ]
    assert (staged / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert not (staged / "resolv.conf").is_symlink()
    assert os.readlink(staged / "mtab") == "../proc/self/mounts"

    # the view shows /etc from there
    monkeypatch.setattr(etc_view, "ETC_SOURCE", str(etc))
    view = isolation.ImageView.of_this_machine(tmp_path / "state")
    assert view.source("/etc") == str(staged) and view.for_image([]).source("/etc") == str(staged)
    mounts = isolation.layout(tmp_path / "root", view, {}, hostname="h", network="none")["mounts"]
    assert ("ro", str(staged), "/etc") in mounts


def test_an_allowed_link_into_a_hidden_part_of_etc_shows_what_it_leads_to(
    tmp_path: Path,
) -> None:
    """Fedora's ``/etc/ssl/certs -> ../pki/tls/certs``: the view holds the certificates
    (others may read them), not a link that would lead nowhere in the sandbox."""
    etc = tmp_path / "etc"
    (etc / "pki/tls/certs").mkdir(parents=True)
    (etc / "pki/tls/certs/ca-bundle.crt").write_text("a CA\n")
    (etc / "pki/tls/private").mkdir()
    (etc / "pki/tls/private/key.pem").write_text("a key\n")
    (etc / "ssl").mkdir()
    (etc / "ssl/certs").symlink_to("../pki/tls/certs")
    (etc / "alternatives").mkdir()
    (etc / "alternatives/awk").symlink_to("/usr/bin/mawk")  # into the userland: a link
    staged = tmp_path / "etc-view"
    etc_view.stage_etc(etc, staged)
    assert not (staged / "ssl/certs").is_symlink()
    assert (staged / "ssl/certs/ca-bundle.crt").read_text() == "a CA\n"
    assert not (staged / "pki").exists()
    assert os.readlink(staged / "alternatives/awk") == "/usr/bin/mawk"


def test_a_canary_root_only_file_of_the_etc_source_never_reaches_a_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole way, through the modal client, with /etc from a tree of the test's:
    its canaries (root-only inside an allowed directory, world-readable outside the
    list) are not in the sandbox; its allowed files are."""
    marker = uuid.uuid4().hex
    etc = tmp_path / "etc"
    etc_view.stage_etc("/etc", etc)  # what this machine's sandboxes need, to run python
    with open(etc / "passwd", "a") as f:
        f.write(f"pm{marker[:8]}:x:4242:4242::/nonexistent:/usr/sbin/nologin\n")
    (etc / "apt/auth.conf.d").mkdir(parents=True, exist_ok=True)
    canary = etc / "apt/auth.conf.d/pm-canary.conf"
    canary.write_text(marker)
    canary.chmod(0o600)
    (etc / "pm-canary-outside").write_text(marker)
    monkeypatch.setattr(etc_view, "ETC_SOURCE", str(etc))
    with LocalModal(state_dir=tmp_path / "local-modal") as lm:
        if lm.isolation is None:
            pytest.skip(reason=f"needs isolated sandboxes: {lm.not_isolated_because}")
        app = modal.App.lookup(f"t-{marker[:10]}", create_if_missing=True, client=lm.client)
        sb = modal.Sandbox.create(
            "sh", "-c",
            "getent passwd 4242; cat /etc/apt/auth.conf.d/pm-canary.conf /etc/pm-canary-outside",
            app=app, client=lm.client,
        )  # fmt: skip
        sb.wait(raise_on_termination=False)
        out, err = sb.stdout.read(), sb.stderr.read()
    assert out.startswith(f"pm{marker[:8]}:x:4242:"), (out, err)
    assert marker not in out.replace(f"pm{marker[:8]}", "")
    assert "No such file" in err and sb.returncode != 0
