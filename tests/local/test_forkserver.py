"""The fork server: ``python -c`` sandboxes forked from a warm interpreter.

Each test runs real sandboxes through the real modal client and checks what
the sandbox process itself sees (argv, environment, fds, session, parent),
so a difference from a freshly exec'd ``python -c`` shows up here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import modal
import pytest
from notices import program_stderr
from sandbox_pids import host_pids
from waiting import wait_for

from prefect_modal.cli.services import start_local_modal
from prefect_modal.local import LocalModal, make_client
from prefect_modal.local.records import read_listing
from prefect_modal.local.runtime import forkserver, zygote
from prefect_modal.local.runtime.processes import pid_alive

REPORT = r"""
import json, os, sys
print(json.dumps({
    "argv": sys.argv,
    "name": __name__,
    "main_names": sorted(k for k in globals() if not k.startswith("__")),
    "ppid": os.getppid(),
    "pid": os.getpid(),
    "warm": "cloudpickle" in sys.modules,
    "leader": os.getsid(0) == os.getpid() == os.getpgrp(),
    "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "no_site": sys.flags.no_site,
    "stdin": sys.stdin.read(),
    "sandbox_id": os.environ["MODAL_SANDBOX_ID"],
}))
"""


def _zygote_pids(parent: int | None = None) -> set[int]:
    """Zygotes: processes running the zygote program that a server started (its direct
    children; a sandbox's monitor and init are forks of a zygote, one level further)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if zygote.FILENAME.encode() in f.read() and _ppid(int(name)) == parent:
                    found.add(int(name))
        except (OSError, ValueError):
            continue
    return found


def _record(lm: LocalModal, sandbox_id: str) -> Any:
    return next(r for r in lm.sandboxes() if r.id == sandbox_id)


#: Sandboxes here run an image with cloudpickle: what a warm zygote preloads, and so
#: how a report tells a forked sandbox from an exec'd one.
IMAGE = modal.Image.debian_slim().pip_install("cloudpickle")


def _run(app: Any, client: Any, *args: str, stdin: bytes = b"", **kwargs: Any) -> Any:
    kwargs.setdefault("image", IMAGE)
    sb = modal.Sandbox.create(*args, app=app, client=client, **kwargs)
    sb.stdin.write(stdin)
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait(raise_on_termination=False)
    return sb


def _report(app: Any, client: Any, *flags: str, **kwargs: Any) -> dict[str, Any]:
    sb = _run(app, client, "python", *flags, "-c", REPORT, "a1", "a2", stdin=b"in", **kwargs)
    assert sb.returncode == 0, sb.stderr.read()
    return dict(json.loads(sb.stdout.read()))


def _sleeper(lm: LocalModal, app: Any, with_child: bool = False) -> tuple[Any, list[int]]:
    """A sandbox that sleeps; returns it and the host pids of its program (and of a child
    it started), once it runs."""
    spawn = "c = subprocess.Popen(['sleep', '1000']); " if with_child else ""
    shown = "os.getpid(), c.pid" if with_child else "os.getpid()"
    program = f"import os, subprocess, time; {spawn}print({shown}, flush=True); time.sleep(1000)"
    sb = modal.Sandbox.create("python", "-c", program, app=app, client=lm.client, image=IMAGE)
    inner = [int(x) for x in next(iter(sb.stdout)).split()]
    return sb, host_pids(_record(lm, sb.object_id).init_pid, inner)


def _forked_report(app: Any, client: Any, *flags: str, **kwargs: Any) -> dict[str, Any]:
    """A report from a sandbox forked by a warm zygote (the first ones are exec'd by the
    launcher while the warm zygote starts)."""
    report = _report(app, client, *flags, **kwargs)  # a cold image cache builds it first
    deadline = time.monotonic() + 20
    while True:
        if not report["warm"]:
            report = _report(app, client, *flags, **kwargs)
        if report["warm"]:
            return report
        assert time.monotonic() < deadline, "no sandbox was forked by the zygote within 20 s"
        time.sleep(0.1)


@pytest.mark.parametrize("flags", [(), ("-S",)], ids=["python-c", "python-S-c"])
def test_a_forked_sandbox_sees_what_python_c_would(
    local_modal: LocalModal, app: Any, flags: tuple[str, ...]
) -> None:
    report = _forked_report(app, local_modal.client, *flags, workdir="/tmp")
    assert (report["pid"], report["ppid"]) == (2, 1)  # its own PID namespace, under its init
    assert report["argv"] == ["-c", "a1", "a2"]
    assert report["name"] == "__main__"
    assert report["main_names"] == ["json", "os", "sys"]  # nothing of the zygote's
    assert report["leader"] is True  # its own session and process group
    assert report["fds"] == [0, 1, 2, 3]  # 3 is the listdir of /proc/self/fd itself
    assert report["no_site"] == (1 if flags else 0)
    assert report["stdin"] == "in"
    assert report["cwd"] == "/tmp"
    assert "MODAL_LOCAL_ROOT" not in report["env"]
    assert report["env"]["MODAL_SANDBOX_ID"].startswith("sb-")
    plain = _report(app, local_modal.client, *flags)  # the same env keys as any other sandbox
    assert set(plain["env"]) - {"MODAL_SANDBOX_ID"} == set(report["env"]) - {"MODAL_SANDBOX_ID"}


def test_exit_codes_and_tracebacks_are_those_of_python_c(local_modal: LocalModal, app: Any) -> None:
    client = local_modal.client
    _forked_report(app, client)  # the zygote is ready from here on
    warm = "import sys; print('cloudpickle' in sys.modules, flush=True); "
    cases = {
        "raise SystemExit(3)": 3,
        "import sys; sys.exit('bye')": 1,
        "x = 1 / 0": 1,
        "def f(:": 1,
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)": 143,
        "raise KeyboardInterrupt": 130,
        "pass": 0,
    }
    for code, expected in cases.items():
        source = code if code.startswith("def") else warm + code
        sb = _run(app, client, "python", "-c", source)
        err = program_stderr(sb.stderr.read())
        assert sb.returncode == expected, (code, err)
        assert zygote.FILENAME not in err  # our frames never show
        if code.startswith("def"):
            assert err.startswith('  File "<string>", line 1') and "SyntaxError" in err
        else:
            assert sb.stdout.read().strip() == "True", code  # it was forked
    sb = _run(app, client, "python", "-c", "x = 1 / 0")
    err = program_stderr(sb.stderr.read())
    assert err.splitlines()[:2] == [
        "Traceback (most recent call last):",
        '  File "<string>", line 1, in <module>',
    ]
    assert err.splitlines()[-1] == "ZeroDivisionError: division by zero"


def test_secrets_stay_in_their_own_sandbox(local_modal: LocalModal, app: Any) -> None:
    client = local_modal.client
    value = "forked-secret-value-4242"
    first = _forked_report(app, client, secrets=[modal.Secret.from_dict({"TOKEN": value})])
    assert first["env"]["TOKEN"] == value
    later = _forked_report(app, client)
    assert "TOKEN" not in later["env"]
    for pid in _zygote_pids():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert value.encode() not in f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert value.encode() not in f.read()


def test_what_is_not_forked(tmp_path: Path, app: Any, local_modal: LocalModal) -> None:
    """A memory limit without cgroups, another program or the switch turned off: exec'd
    by the launcher. With cgroups a memory limit is forked as any sandbox: the child
    joins the sandbox's group before anything else (`container.join_cgroups`)."""
    client = local_modal.client
    _forked_report(app, client)
    limited = _report(app, client, memory=(256, 4096))
    assert limited["warm"] is ("memory" in local_modal.limits_enforced)
    assert limited["pid"] == 2  # still in its own container
    server = forkserver.ForkServer(tmp_path)
    assert server.match(["python", "-u", "-c", "pass"], {"PATH": ""}) is None
    assert server.match(["/usr/bin/env", "-c", "x"], {"PATH": ""}) is None

    with LocalModal(state_dir=tmp_path / "off", fork_server=False) as off:
        app_off = modal.App.lookup("off", create_if_missing=True, client=off.client)
        reports = [_report(app_off, off.client) for _ in range(3)]
        assert {r["warm"] for r in reports} == {False}


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(forkserver.ENV_SWITCH, "0")
    assert forkserver.enabled_by_default() is False
    monkeypatch.setenv(forkserver.ENV_SWITCH, "1")
    assert forkserver.enabled_by_default() is True
    monkeypatch.delenv(forkserver.ENV_SWITCH)
    assert forkserver.enabled_by_default() is True


def test_terminate_kills_a_forked_sandbox_and_what_it_started(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    _forked_report(app, client)
    sb, (program, child) = _sleeper(local_modal, app, with_child=True)
    rec = _record(local_modal, sb.object_id)
    (init,) = host_pids(rec.init_pid, [1])  # the container's pid 1 (the record names its monitor)
    assert rec.pid and _ppid(rec.pid) in _zygote_pids()
    assert pid_alive(rec.pid) and pid_alive(init) and pid_alive(program) and pid_alive(child)
    sb.terminate()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137
    gone = [rec.pid, rec.init_pid, init, program, child]
    wait_for(lambda: not any(pid_alive(p) for p in gone), 5, "no process left")


def test_a_killed_zygote_takes_its_sandboxes_and_is_replaced(
    local_modal: LocalModal, app: Any
) -> None:
    client = local_modal.client
    _forked_report(app, client)
    sb, (program,) = _sleeper(local_modal, app)
    zygote_pid = _ppid(_record(local_modal, sb.object_id).pid)
    assert zygote_pid in _zygote_pids()
    os.kill(zygote_pid, signal.SIGKILL)
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137  # killed with its zygote, reported as such
    wait_for(lambda: not pid_alive(program), 5, "the sandbox's program is gone")
    _forked_report(app, client)  # sandboxes go on, forked by a new zygote
    _sb, _ = _sleeper(local_modal, app)
    new_zygote = _ppid(_record(local_modal, _sb.object_id).pid)
    assert new_zygote != zygote_pid and new_zygote in _zygote_pids()
    _sb.terminate()


def test_zygote_stops_with_the_server(tmp_path: Path) -> None:
    before = _zygote_pids()
    with LocalModal(state_dir=tmp_path / "s") as lm:
        app = modal.App.lookup("z", create_if_missing=True, client=lm.client)
        _forked_report(app, lm.client)
        ours = _zygote_pids() - before
        assert len(ours) == 2  # the launcher and the warm `python -c` zygote
    wait_for(lambda: not any(pid_alive(p) for p in ours), 10, "no process left")


def test_forked_sandboxes_and_zygote_die_with_a_killed_server(tmp_path: Path) -> None:
    """SIGKILL: the zygotes die with the server, the sandboxes with their zygote."""
    server = start_local_modal(tmp_path / "state")
    try:
        client = make_client(
            server.env["MODAL_SERVER_URL"],
            server.env["MODAL_TOKEN_ID"],
            server.env["MODAL_TOKEN_SECRET"],
        )
        app = modal.App.lookup("orphans", create_if_missing=True, client=client)
        program = "import time; print('up', flush=True); time.sleep(1000)"
        sb = modal.Sandbox.create("python", "-c", program, app=app, client=client)
        assert next(iter(sb.stdout)).strip() == "up"
        listing = read_listing(tmp_path / "state" / "sandboxes.json")
        rec = next(r for r in listing if r.id == sb.object_id)
        zygotes = _zygote_pids(server.pid)
        assert rec.pid and rec.init_pid and _ppid(rec.pid) in zygotes
        assert all(pid_alive(p) for p in [rec.pid, rec.init_pid, *zygotes])
        os.kill(server.pid, signal.SIGKILL)  # the server alone: no cleanup runs
        server.process.wait()
        gone = [rec.pid, rec.init_pid, *zygotes]
        wait_for(lambda: not any(pid_alive(p) for p in gone), 5, "no process left")
    finally:
        server.stop()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])
