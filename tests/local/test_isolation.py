"""Each local sandbox is a container: its own root, process view and (when asked) network.

Programs written for Modal's Sandbox API, driven by the real modal client:
what they write is where they run it, a hostile one cannot touch or read the
host, ``block_network`` blocks, ``pty`` gives a terminal. Without namespaces
(``isolation=False`` here) the server says so and refuses what it cannot do.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import modal
import pytest
from waiting import wait_for

from prefect_modal.local import LocalModal
from prefect_modal.local.runtime.isolation import why_not_isolated

_WHY_NOT = why_not_isolated(True) if os.path.exists("/proc/self/ns/pid") else "no namespaces"
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None,
    reason=f"isolated sandboxes need Linux namespaces (as root, or user namespaces): {_WHY_NOT}",
)
#: the start of the reason of tests that only root can run (`tests/local/test_nonroot.py`
#: runs this file as a normal user and accepts these skips, and no other)
ROOT_ONLY = "only as root"

PY = "python"


def _create(lm: LocalModal, app: Any, *args: str, **kwargs: Any) -> Any:
    return modal.Sandbox.create(*args, app=app, client=lm.client, **kwargs)


def _run(sb: Any, *args: str, **kwargs: Any) -> tuple[int, str, str]:
    p = sb.exec(*args, **kwargs)
    code = p.wait()
    return code, p.stdout.read(), p.stderr.read()


def test_the_server_isolates(local_modal: LocalModal) -> None:
    assert local_modal.isolation is not None, local_modal.not_isolated_because


def test_write_a_file_then_run_it_by_its_absolute_path(
    local_modal: LocalModal, app: Any, backend: str
) -> None:
    sb = _create(local_modal, app)
    sb.filesystem.write_text("import os\nprint('ran', os.getcwd())\n", "/workspace/main.py")
    assert _run(sb, PY, "/workspace/main.py") == (0, "ran /\n", "")
    assert _run(sb, PY, "main.py", workdir="/workspace") == (0, "ran /workspace\n", "")
    assert _run(sb, "pwd", workdir="/usr/bin") == (0, "/usr/bin\n", "")
    # what a process writes, the file API reads, at the same absolute path
    assert _run(sb, "sh", "-c", "echo made-here > /tmp/out.txt")[0] == 0
    assert sb.filesystem.read_text("/tmp/out.txt") == "made-here\n"
    assert not Path("/workspace/main.py").exists()  # nothing of it on the host's /
    # a missing workdir is created, as Modal's runtime does; not in the read-only image
    assert _run(sb, "pwd", workdir="/no/such/dir") == (0, "/no/such/dir\n", "")
    code, _out, err = _run(sb, "pwd", workdir="/usr/no-such-dir")
    assert code == 126 and "failed to create process working directory" in err, err
    sb.terminate()


def test_a_sandbox_sees_only_its_own_processes(local_modal: LocalModal, app: Any) -> None:
    code = "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    sb = _create(local_modal, app, PY, "-c", code)
    sb.wait()
    pids = json.loads(sb.stdout.read())
    assert pids == [1, 2], pids  # its init and itself
    assert os.getpid() not in pids


def test_a_hostile_sandbox_changes_and_reads_nothing_of_the_host(
    local_modal: LocalModal, app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "host-secret-value-5150"
    monkeypatch.setenv("HOSTILE_TEST_TOKEN", secret)  # in this (the flow's) process
    precious = tmp_path / "precious.txt"
    precious.write_text(secret)
    hosts_before = Path("/etc/hosts").read_bytes()
    home = Path(os.path.expanduser("~root"))
    script = f"""
set +e
rm -rf {precious} {tmp_path}
echo hostile > /usr/hostile-was-here
echo hostile >> /etc/hosts
echo hostile > /etc/hostile-was-here
cat /proc/{os.getpid()}/environ
cat {precious}
ls -a {home}
cat /etc/shadow
grep -r {secret} /proc/*/environ 2>/dev/null
echo done
"""
    sb = _create(local_modal, app, "sh", "-c", script)
    sb.wait()
    out, err = sb.stdout.read(), sb.stderr.read()
    assert "done" in out
    assert secret not in out and secret not in err
    assert precious.read_text() == secret  # the host file is still there, unchanged
    assert Path("/etc/hosts").read_bytes() == hosts_before
    assert not Path("/usr/hostile-was-here").exists()
    assert not Path("/etc/hostile-was-here").exists()
    assert "Read-only file system" in err  # what it tried was refused, not pretended
    try:
        host_home = {p.name for p in home.iterdir()} if home.is_dir() else set()
    except PermissionError:  # a normal user's test: root's home is closed to it anyway
        host_home = set()
    shown_home = set(out.split())
    assert not (host_home - {".pyenv"}) & shown_home  # only the Python it runs on


def test_rm_rf_root_in_a_sandbox_leaves_the_host_alone(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    """One of Modal's own examples. Run only once the checks above hold for this server."""
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    probe = _create(local_modal, app, "sh", "-c", f"touch {canary}2 /usr/probe 2>&1; ls /proc")
    probe.wait()
    assert not Path(f"{canary}2").exists() and not Path("/usr/probe").exists()
    sb = _create(local_modal, app, "sh", "-c", "rm -rf --no-preserve-root / 2>/dev/null; echo gone")
    sb.wait()
    assert sb.stdout.read() == "gone\n"
    assert canary.read_text() == "alive"
    assert Path("/usr/bin/env").exists() and Path("/etc/hosts").exists()
    after = _create(local_modal, app, "sh", "-c", "echo still-works")  # the server goes on
    after.wait()
    assert after.stdout.read() == "still-works\n"


def test_root_inside_is_not_root_outside(local_modal: LocalModal, app: Any) -> None:
    """A user namespace per sandbox: its root is another id on the host (as root), or
    the user who runs the server (as a normal user)."""
    assert local_modal.isolation is not None and local_modal.isolation.idmap is not None
    sb = _create(local_modal, app, "sh", "-c", "id -u; cat /proc/self/uid_map")
    sb.wait()
    inside, *lines = sb.stdout.read().splitlines()
    first = lines[0].split()
    assert inside == "0" and first[0] == "0", lines
    outside = int(first[1])
    assert outside == local_modal.isolation.idmap.root[0]
    if os.geteuid() == 0:
        assert outside != 0 and not any(line.split()[1] == "0" for line in lines), lines
    else:
        assert outside == os.geteuid()
    # other ids exist inside only with a full range (what dpkg needs); else a chown says no
    give = _create(
        local_modal, app, "sh", "-c", "touch /tmp/f && chown 5:7 /tmp/f && stat -c %u:%g /tmp/f"
    )
    give.wait()
    if local_modal.isolation.idmap.full:
        assert give.stdout.read() == "5:7\n", give.stderr.read()
    else:
        assert give.returncode != 0 and "Invalid argument" in give.stderr.read()


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason=f"{ROOT_ONLY}: a normal user's sandbox is that user, who may read their own files",
)
def test_root_inside_cannot_read_host_roots_private_files(tmp_path: Path) -> None:
    """Attack: container root was host root (with CAP_DAC_OVERRIDE), so a root-only file
    in what a sandbox sees (here a ``host_dirs`` directory) was readable."""
    shown = tmp_path / "shown"
    shown.mkdir()
    canary = shown / "root-only.txt"
    canary.write_text("root-only-canary-8841")
    canary.chmod(0o600)
    lm = LocalModal(state_dir=tmp_path / "state", host_dirs=[shown]).start()
    try:
        app = modal.App.lookup("private", create_if_missing=True, client=lm.client)
        sb = modal.Sandbox.create("sh", "-c", f"cat {canary}; echo done", app=app, client=lm.client)
        sb.wait()
        out, err = sb.stdout.read(), sb.stderr.read()
        assert out.strip().endswith("done"), (out, err)
        assert "root-only-canary-8841" not in out + err
        assert "Permission denied" in err
    finally:
        lm.stop()
    assert canary.read_text() == "root-only-canary-8841"


_KEYCTL = {"x86_64": 250, "aarch64": 219}
_ADD_KEY = {"x86_64": 248, "aarch64": 217}
_KEY_SPEC_USER_KEYRING = -4


@pytest.mark.skipif(
    os.geteuid() != 0 or platform.machine() not in _KEYCTL,
    reason=f"{ROOT_ONLY} (x86_64, aarch64): a normal user's sandbox is that user, whose keyring "
    "the seccomp filter guards",
)
def test_a_sandbox_cannot_read_host_roots_keyring(local_modal: LocalModal, app: Any) -> None:
    """Attack: container root was host root, so root's user keyring (``@u``) was its own:
    ``keyctl`` found and read a key there. In a user namespace root inside is another
    user, with a keyring of its own."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    machine = platform.machine()
    name = f"prefect-modal-canary-{os.getpid()}".encode()
    value = b"keyring-canary-6502"
    key = libc.syscall(_ADD_KEY[machine], b"user", name, value, len(value), _KEY_SPEC_USER_KEYRING)
    if key < 0:
        pytest.skip(reason=f"{ROOT_ONLY}: this kernel has no keyrings ({ctypes.get_errno()})")
    try:
        libc.syscall(_KEYCTL[machine], 5, key, 0x3F3F0000)  # KEYCTL_SETPERM: user may read
        code = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
key = libc.syscall({_KEYCTL[machine]}, 10, {_KEY_SPEC_USER_KEYRING}, b"user", {name!r}, 0)
buf = ctypes.create_string_buffer(256)
n = libc.syscall({_KEYCTL[machine]}, 11, key, buf, 256) if key > 0 else -1
print("found" if key > 0 else "absent", buf.raw[: max(n, 0)])
"""
        sb = _create(local_modal, app, PY, "-c", code)
        sb.wait()
        out = sb.stdout.read()
        assert out.startswith("absent"), out
        assert value.decode() not in out
    finally:
        libc.syscall(_KEYCTL[machine], 21, key)  # KEYCTL_INVALIDATE: the canary goes


def _listener() -> tuple[socket.socket, int, list[bytes]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                got.append(conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1], got


def test_block_network_cannot_reach_the_hosts_loopback(local_modal: LocalModal, app: Any) -> None:
    srv, port, got = _listener()
    try:
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'hi')\n"
            "    print('reached')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n"
        )
        blocked = _create(local_modal, app, PY, "-c", code, block_network=True)
        blocked.wait()
        assert blocked.stdout.read().startswith("refused")
        assert got == []
        own = _create(local_modal, app, PY, "-c", code)  # a network of its own: not the host's
        own.wait()
        assert own.stdout.read().startswith("refused")
        assert got == []
    finally:
        srv.close()


def test_allowlists_are_refused_not_ignored(local_modal: LocalModal, app: Any) -> None:
    with pytest.raises(modal.exception.ConflictError, match=r"10\.0\.0\.0/8.*not enforced"):
        _create(local_modal, app, "true", outbound_cidr_allowlist=["10.0.0.0/8"])


def test_two_sandboxes_serve_the_same_port(local_modal: LocalModal, app: Any) -> None:
    """A sandbox that declares ports has a network namespace (and port space) of its own."""
    sbs = []
    for name in ("first", "second"):
        sb = _create(local_modal, app, "sleep", "60", unencrypted_ports=[8000])
        sb.filesystem.write_text(name, "/srv/whoami.txt")
        p = sb.exec(PY, "-m", "http.server", "8000", "--bind", "127.0.0.1", workdir="/srv")
        sbs.append((sb, p, name))
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        print(urllib.request.urlopen('http://127.0.0.1:8000/whoami.txt').read().decode())\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
    )
    for sb, server, name in sbs:
        assert _run(sb, PY, "-c", fetch)[1] == name + "\n"
        assert server.poll() is None  # still serving: its bind did not collide
        sb.terminate()


def test_pty_gives_a_terminal(local_modal: LocalModal, app: Any) -> None:
    code = "import sys, os; print(sys.stdin.isatty(), sys.stdout.isatty(), os.environ.get('TERM'))"
    sb = _create(local_modal, app, PY, "-c", code, pty=True)
    sb.wait()
    assert sb.stdout.read().split() == ["True", "True", "xterm"]
    plain = _create(local_modal, app, PY, "-c", code)
    plain.wait()
    assert plain.stdout.read().split()[:2] == ["False", "False"]


def test_without_isolation_the_server_says_so_and_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="prefect_modal.local"):
        lm = LocalModal(state_dir=tmp_path, isolation=False).start()
    try:
        assert lm.isolation is None and "turned off" in (lm.not_isolated_because or "")
        assert any("cannot isolate sandboxes" in r.getMessage() for r in caplog.records)
        app = modal.App.lookup("plain", create_if_missing=True, client=lm.client)
        sb = modal.Sandbox.create("echo", "hi", app=app, client=lm.client)
        sb.wait()
        assert (
            sb.stderr.read()
            .splitlines()[0]
            .startswith("[prefect-modal local] this sandbox is NOT isolated")
        )
        with pytest.raises(modal.exception.ConflictError, match="block_network=True needs"):
            modal.Sandbox.create("true", app=app, client=lm.client, block_network=True)
        with pytest.raises(modal.exception.ConflictError, match="pty=True needs"):
            modal.Sandbox.create("true", app=app, client=lm.client, pty=True)
    finally:
        lm.stop()


def _pasta_children() -> set[int]:
    """pasta processes this test process (the embedded server) started."""
    me, found = os.getpid(), set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and os.path.basename(argv0).startswith(b"pasta"):  # or pasta.avx2
            found.add(int(name))
    return found


@pytest.mark.skipif(
    shutil.which("pasta") is None,
    reason="pasta (Debian package passt) gives sandboxes outbound access",
)
def test_a_sandbox_gets_outbound_access_and_its_pasta_ends_with_it(
    local_modal: LocalModal, app: Any
) -> None:
    sb = _create(local_modal, app, "sleep", "60", unencrypted_ports=[8000])
    code, out, _ = _run(sb, "cat", "/proc/net/route")
    interfaces = {line.split()[0] for line in out.splitlines()[1:]}
    assert code == 0 and interfaces - {"lo"}, out  # a route off its own loopback
    pasta = local_modal.registry.sandboxes[sb.object_id]._pasta
    assert pasta is not None and pasta.pid in _pasta_children()
    sb.terminate()
    wait_for(lambda: pasta.pid not in _pasta_children(), 5, "pasta ends with its sandbox")


def test_no_pasta_is_left_when_the_server_stops(tmp_path: Path) -> None:
    """Namespaces made ahead (`netns_pool`) and their pasta go with the server."""
    before = _pasta_children()
    with LocalModal(state_dir=tmp_path / "lm") as lm:
        app = modal.App.lookup("pool", create_if_missing=True, client=lm.client)
        modal.Sandbox.create("true", app=app, client=lm.client).wait()
        modal.Sandbox.create("sleep", "60", app=app, client=lm.client)
    assert _pasta_children() - before == set()
