"""Issue 22, items 3 and 5: hostile programs in a local sandbox, against canaries.

Each test is an attack from the issue, run through the real modal client, and
checks the outcome: the call is refused (seccomp, with Docker's default
profile's errno), the host's canary is unchanged, or the secret is not found.
Nothing here changes the host: the keyring canary, if an attack ever got
through, is invalidated again by the test.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import uuid
from pathlib import Path
from typing import Any

import modal
import pytest
from waiting import wait_for

from prefect_modal.local import LocalModal
from prefect_modal.local.runtime import seccomp_filter
from prefect_modal.local.runtime.isolation import why_not_isolated

_WHY_NOT = why_not_isolated(True) if os.path.exists("/proc/self/ns/pid") else "no namespaces"
pytestmark = [
    pytest.mark.skipif(
        _WHY_NOT is not None,
        reason=f"isolated sandboxes need Linux namespaces (root, or user namespaces): {_WHY_NOT}",
    ),
]

needs_seccomp = pytest.mark.skipif(
    seccomp_filter.why_unavailable() is not None,
    reason=f"no seccomp filter on this machine: {seccomp_filter.why_unavailable()}",
)

PY = "python"

#: A program's calls, each reported as "ok" or the errno's name (x86_64 and aarch64
#: numbers; the generic table is aarch64's).
_SYSCALLS = """
import ctypes, errno, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
NR = {
    "x86_64": dict(keyctl=250, add_key=248, request_key=249, bpf=321, setns=308,
                   clone3=435, unshare=272, mount=165, ptrace=101, clone=56),
    "aarch64": dict(keyctl=219, add_key=217, request_key=218, bpf=280, setns=268,
                    clone3=435, unshare=97, mount=40, ptrace=117, clone=220),
}[platform.machine()]
def call(name, *args):
    r = libc.syscall(NR[name], *args)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
"""


def _create(lm: LocalModal, app: Any, *args: str, **kwargs: Any) -> Any:
    return modal.Sandbox.create(*args, app=app, client=lm.client, **kwargs)


def _report(lm: LocalModal, app: Any, code: str) -> dict[str, str]:
    """Run ``code`` (after `_SYSCALLS`) in a new sandbox; the JSON it prints."""
    sb = _create(lm, app, PY, "-c", _SYSCALLS + code)
    sb.wait()
    out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0, err
    return dict(json.loads(out))


def _first_line(sb: Any) -> str:
    """What the sandbox's program printed first (it goes on running)."""
    text = ""
    for chunk in sb.stdout:
        text += chunk
        if "\n" in text:
            return text.split("\n", 1)[0]
    raise AssertionError(f"the program ended without a line: {sb.stderr.read()}")


# ----- seccomp (item 3) ---------------------------------------------------------------


def _host_keys() -> str:
    with open("/proc/keys") as f:
        return f.read()


def _invalidate_host_key(description: str) -> None:
    """Undo a canary key that an attack added to this host's keyring (only then)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for line in _host_keys().splitlines():
        if description in line:
            keyctl = {"x86_64": 250, "aarch64": 219}[platform.machine()]
            libc.syscall(keyctl, 21, int(line.split()[0], 16))  # KEYCTL_INVALIDATE


@needs_seccomp
def test_keyrings_are_refused_and_the_hosts_keyring_is_unchanged(
    local_modal: LocalModal, app: Any
) -> None:
    canary = f"prefect-modal-canary-{uuid.uuid4().hex[:12]}"
    code = f"""
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4
print(json.dumps({{
    "read session keyring": call("keyctl", 0, KEY_SPEC_SESSION, 0),
    "read user keyring": call("keyctl", 0, KEY_SPEC_USER, 0),
    "add_key": call("add_key", b"user", b"{canary}", b"canary", 6, KEY_SPEC_USER),
    "request_key": call("request_key", b"user", b"{canary}-other", None, 0),
}}))
"""
    try:
        report = _report(local_modal, app, code)
        after = _host_keys()
    finally:
        _invalidate_host_key(canary)
    assert report == {
        "read session keyring": "EPERM",
        "read user keyring": "EPERM",
        "add_key": "EPERM",
        "request_key": "EPERM",  # the kernel alone answers ENOKEY
    }, report
    assert canary not in after


@needs_seccomp
def test_new_user_namespaces_and_mounts_are_refused(local_modal: LocalModal, app: Any) -> None:
    """The issue's way to the host's cgroups: a user namespace of its own, where the
    program is root again and may mount; refused as Docker does (clone3: ENOSYS,
    so that libc falls back to clone, whose namespace flags are refused)."""
    code = """
import subprocess, threading
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
report = {}
unshare = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
report["unshare -U"] = "ok" if unshare.returncode == 0 else unshare.stderr.strip()[-60:]
pid = libc.syscall(NR["clone"], CLONE_NEWUSER | 17, 0, 0, 0, 0)  # 17: SIGCHLD
if pid == 0:
    os._exit(0)  # a child in a user namespace of its own (the attack went through)
report["clone user"] = "ok" if pid > 0 else errno.errorcode[ctypes.get_errno()]
if pid > 0:
    os.waitpid(pid, 0)
report["unshare user+mount"] = call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
os.makedirs("/tmp/mnt-canary", exist_ok=True)
report["mount"] = call("mount", b"none", b"/tmp/mnt-canary", b"tmpfs", 0, None)
report["clone3"] = call("clone3", 0, 0)  # the kernel alone answers EINVAL
ran = []
t = threading.Thread(target=ran.append, args=(1,)); t.start(); t.join()
report["a thread"] = "ok" if ran else "failed"
report["a fork"] = "ok" if subprocess.run(["true"]).returncode == 0 else "failed"
print(json.dumps(report))
"""
    report = _report(local_modal, app, code)
    assert report.pop("unshare -U").endswith("Operation not permitted"), report
    assert report == {
        "unshare user+mount": "EPERM",
        "mount": "EPERM",
        "clone user": "EPERM",
        "clone3": "ENOSYS",
        "a thread": "ok",
        "a fork": "ok",
    }, report


@needs_seccomp
def test_setns_and_bpf_are_refused(local_modal: LocalModal, app: Any) -> None:
    # setns on a bad descriptor: the kernel alone answers EBADF; the filter refuses first.
    # bpf: the kernel refuses it too where kernel.unprivileged_bpf_disabled is set.
    code = """
import struct
attr = ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1), 64)  # an array map
print(json.dumps({"setns": call("setns", -1, 0), "bpf": call("bpf", 0, attr, 64)}))
"""
    assert _report(local_modal, app, code) == {"setns": "EPERM", "bpf": "EPERM"}


def test_ptrace_reaches_its_own_child_but_not_the_init(local_modal: LocalModal, app: Any) -> None:
    """Docker allows ptrace (kernels from 4.8): a debugger in the sandbox works on its
    own children. Its init (pid 1) is not dumpable: attaching to it is refused."""
    code = """
import signal
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
report = {"init": call("ptrace", PTRACE_ATTACH, 1, 0, 0)}
if report["init"] == "ok":  # let it go again
    os.waitpid(1, 0x40000000)  # __WALL: the stop of a tracee that is not our child
    call("ptrace", PTRACE_DETACH, 1, 0, 0)
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
report["own child"] = call("ptrace", PTRACE_ATTACH, child, 0, 0)
if report["own child"] == "ok":
    os.waitpid(child, os.WUNTRACED)
    call("ptrace", PTRACE_DETACH, child, 0, 0)
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
print(json.dumps(report))
"""
    assert _report(local_modal, app, code) == {"init": "EPERM", "own child": "ok"}


# ----- the info pipe (item 5) ---------------------------------------------------------

_FORGE = """
import os, sys, time
line = sys.argv[1] + "\\n"
try:
    fds = sorted(os.listdir("/proc/1/fd"))
except OSError as exc:
    fds = type(exc).__name__
outcome = []
for name in ("3", "4", "5"):
    try:
        fd = os.open("/proc/1/fd/" + name, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, line.encode())
        os.close(fd)
        outcome.append(name + ": written")
    except OSError as exc:
        outcome.append(name + ": " + type(exc).__name__)
print("forged", fds, outcome, flush=True)
time.sleep(3600)
"""


def test_a_forged_init_line_leaves_the_file_api_and_exec_inside_the_sandbox(
    local_modal: LocalModal, app: Any, tmp_path: Path
) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    # host pid 1: its root is the host's /, its namespaces the host's
    sb = _create(local_modal, app, PY, "-c", _FORGE, "init 1")
    try:
        assert _first_line(sb).startswith("forged"), sb.stderr.read()
        # the file API and exec still reach the sandbox's own files, at the same place
        sb.filesystem.write_text("forged", str(canary))
        assert sb.filesystem.read_text(str(canary)) == "forged"
        p = sb.exec("sh", "-c", f"cat {canary}; echo; id -u")
        assert p.wait() == 0
        out = p.stdout.read()
        assert out.split() == ["forged", "0"], out
        p = sb.exec("sh", "-c", "ls /proc | grep -c '^[0-9]'")
        p.wait()
        assert int(p.stdout.read()) < 10  # its own process view, not the host's
    finally:
        sb.terminate()
    assert canary.read_text() == "original"


def _marked_pids(marker: str) -> list[int]:
    """Host processes whose command line holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def test_a_forged_exit_line_neither_ends_wait_nor_survives_terminate(
    local_modal: LocalModal, app: Any
) -> None:
    marker = f"forged-exit-{uuid.uuid4().hex[:12]}"
    sb = _create(local_modal, app, PY, "-c", _FORGE, "exit 0", marker)
    assert _first_line(sb).startswith("forged"), sb.stderr.read()
    assert sb.poll() is None  # the program lives: the sandbox has not ended
    assert _marked_pids(marker)
    sb.terminate()
    code = sb.wait(raise_on_termination=False)
    assert code != 0, code
    wait_for(lambda: not _marked_pids(marker), timeout=30, interval=0.05, what="the program's end")


# ----- another sandbox's secret (item 5) ----------------------------------------------

_SCAN = """
import os, signal, sys
snapshot = os.fork()  # a copy of this process as it started: before the needle exists
if snapshot == 0:
    signal.pause()
    os._exit(0)
needle = bytes(reversed(sys.argv[1].encode()))
def scan(pid):
    hits = 0
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as exc:
        return type(exc).__name__
    try:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                data = os.pread(mem, end - start, start)
            except OSError:
                continue
            hits += data.count(needle)
    finally:
        os.close(mem)
    return hits
report = {"init": scan(1), "own memory": scan(snapshot)}
for name in os.listdir("/proc"):
    if name.isdigit() and int(name) not in (1, os.getpid(), snapshot):
        report[name] = scan(int(name))
os.kill(snapshot, signal.SIGKILL)
print(json.dumps(report))
"""


def _count_in_memory(pid: int, needle: bytes) -> int:
    """How often ``needle`` is in the readable memory of host process ``pid``."""
    hits = 0
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                hits += os.pread(fd, end - start, start).count(needle)
            except OSError:
                continue
    finally:
        os.close(fd)
    return hits


def _zygote_pids(lm: LocalModal) -> list[int]:
    return [z.popen.pid for z in lm._ctx.forkserver._zygotes.values() if not z.dead]


def _warm_zygote_ready(lm: LocalModal) -> bool:
    zygotes = lm._ctx.forkserver._zygotes  # which path a sandbox takes
    return any(key != ("launcher",) and z.ready for key, z in zygotes.items())


def test_another_sandboxs_secret_is_not_in_any_memory_a_sandbox_can_read(
    local_modal: LocalModal, app: Any
) -> None:
    secret_value = f"canary-secret-{uuid.uuid4().hex}"
    secret = modal.Secret.from_dict({"CANARY_SECRET": secret_value})
    warm = _create(local_modal, app, PY, "-c", "print(1)")
    warm.wait()
    wait_for(
        lambda: _warm_zygote_ready(local_modal), timeout=60, interval=0.05, what="a warm zygote"
    )
    # sandbox A: its secret in the environment of a forked python -c, of an exec'd
    # program and of an exec in it (the fork server's three ways)
    a = _create(
        local_modal,
        app,
        PY,
        "-c",
        "import os; print(len(os.environ['CANARY_SECRET']))",
        secrets=[secret],
    )
    a.wait()
    assert a.stdout.read().strip() == str(len(secret_value)), a.stderr.read()
    a2 = _create(local_modal, app, "sleep", "600", secrets=[secret])
    try:
        p = a2.exec("sh", "-c", 'test -n "$CANARY_SECRET" && echo has-it')
        p.wait()
        assert p.stdout.read() == "has-it\n"
        # the zygotes that served A (which every later sandbox starts as a copy of)
        # never held its secret: read from the host, as root
        in_zygotes = {
            pid: _count_in_memory(pid, secret_value.encode()) for pid in _zygote_pids(local_modal)
        }
        assert len(in_zygotes) >= 2 and not any(in_zygotes.values()), in_zygotes
        # sandbox B, forked from the same zygotes, scans every memory it can open: as a
        # forked python -c, and as an exec in a sandbox (both zygotes served A)
        scan = ("import json\n" + _SCAN, secret_value[::-1])
        b = _create(local_modal, app, PY, "-c", *scan)
        b.wait()
        out, err = b.stdout.read(), b.stderr.read()
        assert b.returncode == 0, err
        reports = [json.loads(out)]
        b2 = _create(local_modal, app, "sleep", "600")
        p = b2.exec(PY, "-c", *scan)
        p.wait()
        reports.append(json.loads(p.stdout.read()))
        b2.terminate()
    finally:
        a2.terminate()
    for report in reports:
        assert isinstance(report["own memory"], int), report  # its own copy is readable
        assert not any(isinstance(v, int) and v > 0 for v in report.values()), report


def test_without_libseccomp_the_server_says_so_and_sandboxes_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a machine without libseccomp gets (simulated with the switch): the server
    starts, says so once at start and in each sandbox's log, with the fix."""
    monkeypatch.setenv(seccomp_filter.ENV_SWITCH, "0")
    with caplog.at_level(logging.WARNING, logger="prefect_modal.local"):
        with LocalModal(state_dir=tmp_path / "lm") as lm:
            app = modal.App.lookup("no-seccomp", create_if_missing=True, client=lm.client)
            sb = _create(lm, app, "sh", "-c", "grep '^Seccomp:' /proc/self/status")
            sb.wait()
            out, err = sb.stdout.read(), sb.stderr.read()
    assert sb.returncode == 0 and out.split() == ["Seccomp:", "0"], (out, err)
    assert "WITHOUT a seccomp filter" in err and "apt-get install libseccomp2" in err, err
    said = [r.getMessage() for r in caplog.records if "WITHOUT a seccomp filter" in r.getMessage()]
    assert len(said) == 1, said


@needs_seccomp
def test_the_filter_is_on_for_the_program_its_execs_and_its_init(
    local_modal: LocalModal, app: Any
) -> None:
    sb = _create(local_modal, app, "sleep", "600")
    try:
        p = sb.exec("sh", "-c", "grep '^Seccomp:' /proc/self/status /proc/1/status /proc/2/status")
        p.wait()
        out = p.stdout.read()
    finally:
        sb.terminate()
    assert [line.split()[-1] for line in out.splitlines()] == ["2", "2", "2"], out
    assert "WITHOUT a seccomp filter" not in sb.stderr.read()


def test_a_sandbox_holds_only_its_own_stdio(local_modal: LocalModal, app: Any) -> None:
    """No descriptor of the server's (sockets, the info pipe, other sandboxes' pipes)
    reaches a sandbox's processes: a forked python -c, an exec'd program, an exec."""
    listing = "import os; print(sorted(int(n) for n in os.listdir('/proc/self/fd')))"
    a = _create(local_modal, app, PY, "-c", listing)
    a.wait()
    b = _create(local_modal, app, "sh", "-c", "echo $(ls /proc/self/fd); sleep 600")
    try:
        assert _first_line(b) == "0 1 2 3"  # 3: the directory ls opened
        p = b.exec(PY, "-I", "-c", listing)
        p.wait()
        from_exec = p.stdout.read()
    finally:
        b.terminate()
    # 3: the directory os.listdir itself opened
    assert a.stdout.read() == "[0, 1, 2, 3]\n"
    assert from_exec == "[0, 1, 2, 3]\n"
