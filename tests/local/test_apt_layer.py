"""``apt_install`` locally (`prefect_modal.local.build.apt`): packages from this machine's
Debian mirror unpacked into a layer, and a sandbox of the local server, made by the real
modal client from an image with that layer, runs what they hold. Also the layout that makes
a layer's /usr and /etc files visible over the host's read-only directories."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import modal
import pytest

from prefect_modal.local import LocalModal, ids
from prefect_modal.local.build.apt import (
    AptError,
    _Deb,
    _effectful_commands,
    _unpack,
    unpack_packages,
)
from prefect_modal.local.state import ImageInfo


def _mirror_hosts() -> list[tuple[str, int]]:
    """The hosts of this machine's apt sources (deb822 ``URIs:`` and one-line ``deb``)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if path.suffix in (".list", ".sources") and path.is_file():
            texts.append(path.read_text(errors="replace"))
    uris = re.findall(r"^\s*URIs:\s*(\S+)", "\n".join(texts), re.M)
    uris += re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", "\n".join(texts), re.M)
    hosts = []
    for uri in uris:
        u = urlsplit(uri)
        if u.hostname:
            hosts.append((u.hostname, u.port or (443 if u.scheme == "https" else 80)))
    return list(dict.fromkeys(hosts))


@functools.lru_cache(maxsize=1)
def _mirror_problem() -> str | None:
    """Why the Debian mirror cannot be used here, or None (a 3 s connect to each)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get / dpkg-deb are not on this machine (not Debian)"
    hosts = _mirror_hosts()
    if not hosts:
        return "this machine has no apt sources"
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            return f"the Debian mirror {host}:{port} is unreachable ({exc})"
    return None


def _needs_mirror() -> None:
    problem = _mirror_problem()
    if problem is not None:
        pytest.skip(reason=problem)


def _needs_isolation(lm: LocalModal) -> None:
    if lm.isolation is None:
        pytest.skip(reason="image layers are shown only in isolated sandboxes (needs root)")


def _needs_root_over(*packages: str) -> None:
    """Skip for a normal user when this machine has one of ``packages`` installed: a
    normal user's build cannot replace its files (dpkg hard-links the old file first,
    which only root's idmapped mounts allow; docs/local-server.md, the builder's log
    says so). New packages install for both (the php test); root runs this one."""
    if os.geteuid() == 0 or not shutil.which("dpkg-query"):
        return
    held = [
        name
        for name in packages
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True
        ).stdout.endswith(" installed")
    ]
    if held:
        held_names = ", ".join(held)
        why = f"a normal user's apt layer cannot replace this machine's {held_names} (root only)"
        pytest.skip(reason=why)


@pytest.fixture(scope="module")
def apt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One apt cache for the module: package lists are fetched once."""
    return tmp_path_factory.mktemp("apt-cache")


def _image(lm: LocalModal, *layers: Path) -> Any:
    """An image whose layers are ``layers``, registered on the server the way a
    snapshot is, and loaded by the client by its id."""
    image_id = ids.new_id("im")
    lm.registry.add_image(ImageInfo(image_id, "layers under test", {}, list(layers)))
    return modal.Image.from_id(image_id, client=lm.client)


def _run(sb: Any, *args: str) -> tuple[int, str, str]:
    p = sb.exec(*args)
    p.wait()
    return p.returncode, p.stdout.read(), p.stderr.read()


def test_jq_unpacked_by_apt_runs_in_a_sandbox(
    local_modal: LocalModal, app: Any, apt_cache: Path, tmp_path: Path
) -> None:
    _needs_isolation(local_modal)
    _needs_mirror()
    layer = tmp_path / "layer"
    lines: list[str] = []
    unpack_packages(["jq"], layer, cache_dir=apt_cache, log=lines.append)
    assert (layer / "usr/bin/jq").is_file()
    assert any("jq" in line and "packages for jq" in line for line in lines), lines
    assert any(line.startswith("apt: unpacked") for line in lines), lines
    # nothing at the top of the layer that would replace the root's /bin -> usr/bin
    assert not (layer / "bin").exists() or (layer / "bin").is_symlink()

    sb = modal.Sandbox.create(app=app, image=_image(local_modal, layer), client=local_modal.client)
    try:
        code, out, err = _run(sb, "jq", "--version")
        assert code == 0, err
        assert out.startswith("jq-"), out
        code, out, err = _run(sb, "sh", "-c", "echo '{\"a\":1}' | jq .a")
        assert (code, out) == (0, "1\n"), err
        # the layer's jq, not the host's: its bytes
        code, out, err = _run(sb, "sha256sum", "/usr/bin/jq")
        assert code == 0, err
        want = subprocess.run(
            ["sha256sum", str(layer / "usr/bin/jq")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        assert out.split()[0] == want
    finally:
        sb.terminate()


def test_apt_install_through_the_client_gives_a_working_jq(
    local_modal: LocalModal, app: Any
) -> None:
    """The whole way: the client's apt_install line, the builder's apt layer (in the
    shared cache), a sandbox of that image running the layer's jq."""
    _needs_isolation(local_modal)
    _needs_mirror()
    _needs_root_over("jq", "libjq1")
    image = modal.Image.debian_slim().apt_install("jq")
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "echo '{\"a\":1}' | jq .a && sha256sum $(command -v jq)",
        app=app,
        image=image,
        client=local_modal.client,
    )
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, err
    value, digest_line = out.splitlines()
    assert value == "1"
    digest, path = digest_line.split()
    assert path == "/usr/bin/jq"
    built = [
        subprocess.run(["sha256sum", str(p)], capture_output=True, text=True).stdout.split()[0]
        for p in local_modal.image_cache.glob("*/fs/usr/bin/jq")
    ]
    assert digest in built  # the layer's jq, whether or not this machine has one


def test_apt_install_runs_maintainer_scripts_so_php_is_on_path(
    local_modal: LocalModal, app: Any
) -> None:
    """As on Modal, where apt-get install runs in the image build: php8.2-cli's postinst
    (update-alternatives for /usr/bin/php, ucf for php.ini, conf.d links) runs in a build
    sandbox, so ``php`` is on PATH. This machine's /usr, /etc and /var are not changed."""
    _needs_isolation(local_modal)
    _needs_mirror()
    host_had_php = os.path.lexists("/usr/bin/php")
    image = modal.Image.debian_slim().apt_install("php-cli")
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "php -r 'echo 1;' && echo && readlink /usr/bin/php /etc/alternatives/php "
        "&& test -d /var/lib/dpkg/alternatives && cat /var/lib/dpkg/alternatives/php",
        app=app,
        image=image,
        client=local_modal.client,
    )
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, (out, err)
    lines = out.splitlines()
    assert lines[0] == "1"
    assert lines[1] == "/etc/alternatives/php"
    assert lines[2].startswith("/usr/bin/php") and lines[2] != "/usr/bin/php", lines
    assert lines[3] == "auto"  # update-alternatives' own record of the group
    assert os.path.lexists("/usr/bin/php") == host_had_php
    if not host_had_php:
        assert not os.path.lexists("/etc/alternatives/php")
        assert not os.path.exists("/var/lib/dpkg/alternatives/php")


def test_php_ruby_and_node_from_apt_install_run_as_on_modal(
    local_modal: LocalModal, app: Any
) -> None:
    """Issue 24: ``apt_install("php", "ruby", "nodejs")`` puts the three on PATH, as in
    Modal's image build. ``php`` is the metapackage (it pulls a SAPI too). This machine
    may hold a ``nodejs`` from another vendor that no apt source has: the layer gets
    Debian's, as Modal's base image (which has none) would, and its ``node`` runs."""
    _needs_isolation(local_modal)
    _needs_mirror()
    _needs_root_over("nodejs")
    image = modal.Image.debian_slim().apt_install("php", "ruby", "nodejs")
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "php -r 'echo 1;' && echo && ruby -e 'puts 2' && node -e 'console.log(3)' "
        "&& node --version",
        app=app,
        image=image,
        client=local_modal.client,
    )
    sb.wait(raise_on_termination=False)
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, (out, err)
    lines = out.splitlines()
    assert lines[:3] == ["1", "2", "3"], (out, err)
    debian = subprocess.run(
        ["apt-cache", "madison", "nodejs"], capture_output=True, text=True
    ).stdout
    # the node that ran is the version some apt source offers (v18.19.0 <- 18.19.0+dfsg-...)
    offered = re.findall(r"\|\s*(\d+\.\d+\.\d+)", debian)
    assert lines[3].lstrip("v") in offered, (lines[3], debian)


def test_a_whiteout_in_a_layer_hides_the_host_file(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    """What a package's install removed under /usr or /etc is a whiteout in its layer
    (a 0/0 character device, as overlayfs leaves it): a sandbox of the image does not
    see the host's file there, and the host keeps it."""
    _needs_isolation(local_modal)
    victim = Path("/etc/debian_version")
    if not victim.is_file():
        pytest.skip(reason=f"this machine has no {victim} (not Debian) to hide")
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    os.mknod(layer / "etc/debian_version", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    (layer / "etc/pm-kept.conf").write_text("kept\n")
    sb = modal.Sandbox.create(app=app, image=_image(local_modal, layer), client=local_modal.client)
    try:
        code, out, err = _run(
            sb, "sh", "-c", "cat /etc/pm-kept.conf; test -e /etc/debian_version || echo gone"
        )
        assert (code, out.split()) == (0, ["kept", "gone"]), err
        snap = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    # a snapshot copies the layer's files under /etc: the whiteout too
    sb2 = modal.Sandbox.create(app=app, image=snap, client=local_modal.client)
    try:
        code, out, err = _run(
            sb2, "sh", "-c", "cat /etc/pm-kept.conf; test -e /etc/debian_version || echo gone"
        )
        assert (code, out.split()) == (0, ["kept", "gone"]), err
    finally:
        sb2.terminate()
    assert victim.is_file()


def test_layers_add_files_under_the_read_only_usr_and_etc(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    """A layer's /usr and /etc files are overlaid on the host's read-only directories: seen,
    the later layer wins, the host's files stay, all read-only, masked files stay masked."""
    _needs_isolation(local_modal)
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for layer, word in ((lower, "lower"), (upper, "upper")):
        (layer / "usr/bin").mkdir(parents=True)
        tool = layer / "usr/bin/pm-layer-probe"
        tool.write_text(f"#!/bin/sh\necho {word}\n")
        tool.chmod(0o755)
    (lower / "etc").mkdir()
    (lower / "etc/pm-layer.conf").write_text("from-the-layer\n")
    (lower / "etc/shadow").write_text("not-a-secret-but-masked\n")
    (lower / "opt/data").mkdir(parents=True)
    (lower / "opt/data/x.txt").write_text("copied\n")

    image = _image(local_modal, lower, upper)
    sb = modal.Sandbox.create(app=app, image=image, client=local_modal.client)
    try:
        code, out, err = _run(
            sb,
            "sh",
            "-c",
            "pm-layer-probe; cat /etc/pm-layer.conf /opt/data/x.txt; "
            "test -x /usr/bin/ls && test -f /etc/passwd && echo host-kept; "
            "wc -c < /etc/shadow; "
            "touch /usr/bin/pm-new 2>/dev/null && echo usr-writable || echo usr-ro; "
            "echo x > /etc/pm-layer.conf 2>/dev/null && echo etc-writable || echo etc-ro; "
            "echo changed > /opt/data/x.txt && cat /opt/data/x.txt",
        )
        assert code == 0, err
        assert out.split() == [
            "upper",
            "from-the-layer",
            "copied",
            "host-kept",
            "0",
            "usr-ro",
            "etc-ro",
            "changed",
        ]
        snap = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    # a snapshot keeps what the layers add under /usr and /etc, and the sandbox's writes
    sb2 = modal.Sandbox.create(app=app, image=snap, client=local_modal.client)
    try:
        code, out, err = _run(
            sb2, "sh", "-c", "pm-layer-probe; cat /etc/pm-layer.conf /opt/data/x.txt"
        )
        assert (code, out.split()) == (0, ["upper", "from-the-layer", "changed"]), err
    finally:
        sb2.terminate()
    # the sandbox changed neither the layer nor the host
    assert (lower / "opt/data/x.txt").read_text() == "copied\n"
    assert not os.path.exists("/usr/bin/pm-layer-probe")


@pytest.mark.parametrize(
    "value", ["Bad_Name", "-oAPT::Get::x=1", "j", "jq;rm", "jq=", "", "jq/", "jq/x=1"]
)
def test_a_bad_name_fails_before_any_network(value: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lines: list[str] = []
    with pytest.raises(AptError, match=re.escape(repr(value))) as err:
        unpack_packages(["jq", value], tmp_path / "layer", cache_dir=cache, log=lines.append)
    assert "Debian package names are lower-case letters" in str(err.value)
    # apt never ran: no cache made, nothing logged, no layer
    assert not cache.exists() and lines == [] and not (tmp_path / "layer").exists()


def test_a_package_that_does_not_exist_is_named(apt_cache: Path, tmp_path: Path) -> None:
    _needs_mirror()
    name = "prefect-modal-no-such-package"
    with pytest.raises(AptError, match=f"no Debian package named '{name}'"):
        unpack_packages([name], tmp_path / "layer", cache_dir=apt_cache, log=lambda _: None)
    assert not (tmp_path / "layer").exists()


def test_a_second_call_with_the_same_cache_fetches_nothing(apt_cache: Path, tmp_path: Path) -> None:
    _needs_mirror()
    first: list[str] = []
    unpack_packages(["jq"], tmp_path / "a", cache_dir=apt_cache, log=first.append)
    archives = apt_cache / "archives"
    before = {p.name: p.stat().st_mtime_ns for p in archives.glob("*.deb")}
    assert any(n.startswith("jq_") for n in before), before

    second: list[str] = []
    unpack_packages(["jq"], tmp_path / "b", cache_dir=apt_cache, log=second.append)
    assert any("nothing fetched" in line for line in second), second
    assert not any("fetching" in line or "updating package lists" in line for line in second)
    after = {p.name: p.stat().st_mtime_ns for p in archives.glob("*.deb")}
    assert after == before
    assert (tmp_path / "b/usr/bin/jq").read_bytes() == (tmp_path / "a/usr/bin/jq").read_bytes()


def _build_deb(tmp: Path, postinst: str | None) -> Path:
    """A tiny Debian package: /bin/pm-tool (merged-/usr moves it), /etc/pm-tool.conf."""
    root = tmp / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: pm-tool\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\n"
        "Description: test\n"
    )
    if postinst is not None:
        (root / "DEBIAN/postinst").write_text(postinst)
        (root / "DEBIAN/postinst").chmod(0o755)
    (root / "bin").mkdir()
    (root / "bin/pm-tool").write_text("#!/bin/sh\necho tool\n")
    (root / "bin/pm-tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc/pm-tool.conf").write_text("x=1\n")
    deb = tmp / "pm-tool_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def test_unpacking_warns_of_maintainer_scripts_and_etc_files(tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip(reason="dpkg-deb is not on this machine (not Debian)")
    script = (
        '#!/bin/sh\nset -e\ncase "$1" in\n  configure)\n'
        "    adduser --system pmtool\n"
        "    update-alternatives --install /usr/bin/pm pm /usr/bin/pm-tool 10 \\\n"
        "      --slave /usr/share/man/man1/pm.1.gz pm.1.gz /usr/share/man/man1/pm-tool.1.gz\n"
        "  ;;\nesac\nexit 0\n"
    )
    deb = _build_deb(tmp_path, script)
    dest = tmp_path / "layer"
    lines: list[str] = []
    _unpack([_Deb("pm-tool", "1.0", "all")], [deb], dest, lines.append)
    warning = [line for line in lines if "postinst does more than ldconfig" in line]
    assert len(warning) == 1 and "adduser; update-alternatives" in warning[0], lines
    assert any("1 file under /etc (/etc/pm-tool.conf)" in line for line in lines), lines
    if Path("/bin").is_symlink():  # merged /usr: the layer must not replace /bin
        assert (dest / "usr/bin/pm-tool").is_file() and not (dest / "bin").exists()
    else:
        assert (dest / "bin/pm-tool").is_file()

    quiet = _build_deb(
        tmp_path / "q", '#!/bin/sh\nset -e\nif [ "$1" = configure ]; then\n\tldconfig\nfi\n'
    )
    lines.clear()
    _unpack([_Deb("pm-tool", "1.0", "all")], [quiet], tmp_path / "layer2", lines.append)
    assert not any("warning" in line for line in lines), lines


def test_maintainer_script_reading() -> None:
    debhelper_lib = (
        "#!/bin/sh\nset -e\n# Automatically added by dh_makeshlibs\n"
        'if [ "$1" = "configure" ]; then\n\tldconfig\nfi\n# End automatically added section\n'
    )
    assert _effectful_commands(debhelper_lib) == []
    service = (
        "#!/bin/sh\nset -e\nsetup() {\n  getent passwd svc >/dev/null || useradd -r svc\n}\n"
        "setup\nif [ -d /run/systemd/system ]; then\n  deb-systemd-helper enable svc.service\n"
        "fi\ncat > /etc/svc.conf <<EOF\nrm -rf /\nEOF\n"
    )
    assert _effectful_commands(service) == ["getent", "useradd", "deb-systemd-helper", "cat"]
