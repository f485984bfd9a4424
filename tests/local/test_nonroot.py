"""The README's main job and the isolation tests, run by a normal user.

Most people run as themselves, not root: as a normal user the local server
isolates sandboxes through a user namespace each (the user is root inside).
CI runs as root, so this test makes a normal user of its own (``useradd``,
with a unique name and a home in a temporary directory; ``userdel`` of that
name at the end) and runs as it through ``runuser``.

The user needs to read the checkout and run its ``.venv``. A checkout that
others cannot read is said so (skip, with the fix). When the venv's
interpreter lies under a directory others cannot enter (pyenv under a 0700
``/root``, as on the CI machines), the user's commands run in a private mount
namespace in which that one directory is replaced by a tmpfs that holds only
the interpreter's tree (bound read-only as it is): this machine is unchanged,
and the user still runs the checkout's own ``.venv/bin`` commands.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
#: run as the normal user too: the isolation, attack and network tests
ISOLATION_TESTS = (
    "tests/local/test_isolation.py",
    "tests/local/test_isolation_attacks.py",
    "tests/local/test_network_isolation.py",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="makes a normal user for the test (useradd, runuser): needs root, as CI has",
    ),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("useradd", "userdel", "runuser", "unshare")),
        reason="needs useradd, userdel, runuser and unshare (Debian: passwd, util-linux)",
    ),
]


@dataclass
class NormalUser:
    name: str
    uid: int
    base: Path  # the test's own directory: the home and a TMPDIR, readable by the user
    home: Path
    tmp: Path


def _pids_of(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def normal_user() -> Iterator[NormalUser]:
    base = Path(tempfile.mkdtemp(prefix="prefect-modal-nonroot-"))
    base.chmod(0o755)
    name = f"pmnr{uuid.uuid4().hex[:12]}"
    home = base / "home"
    useradd = ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh"]
    subprocess.run([*useradd, "--user-group", name], check=True, capture_output=True)
    try:
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
        tmp = base / "tmp"
        for d in (home, tmp):
            d.mkdir()
            shutil.chown(d, name, name)
        yield NormalUser(name=name, uid=uid, base=base, home=home, tmp=tmp)
        with contextlib.suppress(AssertionError):  # a sandbox ends just after its server
            wait_for(lambda: not _pids_of(uid), 10, "the test user's processes to end")
        left = {pid: _cmdline(pid) for pid in _pids_of(uid)}
        for pid in left:  # what the runs below started and did not end: by pid, then fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the test user were left running: {left}"
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _others_cannot_enter(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that others may not enter, if any."""
    for parent in reversed([path, *path.parents]):
        if parent.is_dir() and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _checkout_readable(user: NormalUser) -> None:
    """Skip, saying why and the fix, when the user cannot read this checkout."""
    probe = subprocess.run(
        ["runuser", "-u", user.name, "--", "test", "-r", str(REPO / "README.md")],
        capture_output=True,
    )
    if probe.returncode != 0 or not VENV_BIN.is_dir():
        blocked = _others_cannot_enter(REPO)
        why = (
            f"the checkout {REPO} is not readable by other users"
            + (f" ({blocked} is mode {oct(os.stat(blocked).st_mode & 0o777)})" if blocked else "")
            + f" or has no .venv: `chmod o+rx` the directories on the way and `chmod -R o+rX "
            f"{REPO}`, or clone it where others can read it"
        )
        pytest.skip(reason=why)


def _as_user(user: NormalUser, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the checkout as ``user``, with a clean environment of its own."""
    env = {
        "HOME": str(user.home),
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": str(user.tmp),
    }
    runuser = ["runuser", "-u", user.name, "--", "env", "-i"]
    runuser += [f"{k}={v}" for k, v in env.items()]
    interpreter = Path(os.path.realpath(VENV_BIN / "python"))
    blocked = _others_cannot_enter(interpreter)
    if blocked is None:
        command = [*runuser, *argv]
    else:
        inner = blocked / interpreter.relative_to(blocked).parts[0]
        if _others_cannot_enter(inner) not in (None, blocked) and inner != interpreter:
            why = f"the venv's interpreter {interpreter} is under two directories closed to others"
            pytest.skip(reason=why)
        stage = user.base / "stage"
        stage.mkdir(exist_ok=True)
        script = "\n".join(
            [
                "set -e",
                f"mount --bind {shlex.quote(str(blocked))} {shlex.quote(str(stage))}",
                f"mount -t tmpfs -o mode=755,size=64k tmpfs {shlex.quote(str(blocked))}",
                f"mkdir -p {shlex.quote(str(inner))}",
                f"mount --rbind {shlex.quote(str(stage / inner.name))} {shlex.quote(str(inner))}",
                f"umount -l {shlex.quote(str(stage))}",
                'exec "$@"',
            ]
        )
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        command += ["sh", *runuser, *argv]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join((result.stdout + "\n" + result.stderr).splitlines()[-lines:])


def test_the_demo_runs_as_a_normal_user_with_isolated_sandboxes(normal_user: NormalUser) -> None:
    """The README's main job (`.venv/bin/prefect-modal demo`) as a normal user: exit 0,
    and its local Modal server isolated the sandboxes (a user namespace each)."""
    _checkout_readable(normal_user)
    result = _as_user(normal_user, [str(VENV_BIN / "prefect-modal"), "demo"], timeout=1200)
    assert result.returncode == 0, _tail(result)
    logs = sorted(normal_user.tmp.glob("prefect-modal-demo-*/modal/logs/local-modal.log"))
    assert logs, f"the demo left no local Modal server log under {normal_user.tmp}"
    text = logs[-1].read_text(errors="replace")
    assert "# isolation: on" in text and "root inside is this user" in text, text[-2000:]


def _subordinate_ranges(path: str, name: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    ranges = []
    for line in lines:
        owner, start, count = [*line.split(":"), "", "", ""][:3]
        if owner == name and start.isdigit() and count.isdigit():
            ranges.append(f"{start}-{int(start) + int(count) - 1}")
    return ranges


def _give_range(user: NormalUser, wanted: bool) -> None:
    """Give the user a subordinate id range in /etc/subuid and /etc/subgid, or take
    theirs away (``useradd`` gives one where ``uidmap`` made those files)."""
    if wanted:
        if not (shutil.which("newuidmap") and shutil.which("newgidmap")):
            pytest.skip(reason="a subordinate id range needs newuidmap (Debian package uidmap)")
        if _subordinate_ranges("/etc/subuid", user.name) and _subordinate_ranges(
            "/etc/subgid", user.name
        ):
            return
        start = 300_000_000 + (user.uid % 10_000) * 65536
        ids = f"{start}-{start + 65535}"
        subprocess.run(
            ["usermod", "--add-subuids", ids, "--add-subgids", ids, user.name], check=True
        )
        return
    for flag, path in (("--del-subuids", "/etc/subuid"), ("--del-subgids", "/etc/subgid")):
        for ids in _subordinate_ranges(path, user.name):
            subprocess.run(["usermod", flag, ids, user.name], check=True)


@pytest.mark.parametrize("id_range", ["subordinate range", "one id"])
def test_the_isolation_tests_pass_as_a_normal_user(normal_user: NormalUser, id_range: str) -> None:
    """The isolation, attack and network tests (`ISOLATION_TESTS`) as a normal user, with a
    subordinate id range (newuidmap) and with none (a one-id map): every test passes but
    those that only root can run, which say so."""
    _checkout_readable(normal_user)
    _give_range(normal_user, id_range == "subordinate range")
    probe = "from prefect_modal.local.runtime import userns; print(userns.for_this_process().full)"
    full = _as_user(normal_user, [str(VENV_BIN / "python"), "-c", probe], timeout=120)
    assert full.stdout.split() == [str(id_range == "subordinate range")], _tail(full)
    result = _as_user(
        normal_user,
        [str(VENV_BIN / "pytest"), "-q", "-p", "no:cacheprovider", "-rs", *ISOLATION_TESTS],
        timeout=1200,
    )
    assert result.returncode == 0, _tail(result)
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("only as root" in line for line in skips), skips
